#!/usr/bin/env bash
# End-to-end test on a throwaway kind cluster (see e2e/README.md):
#   kind cluster -> build + load the worker and operator images -> helm install the chart
#   (both images as its image / workerImage values)
#   -> pytest e2e (apply examples/tiny-local.yaml unchanged, wait Ready, port-forward the gateway,
#      generate an image, scale the denoiser and watch the StatefulSet follow) -> tear down.
#
# Needs docker (with a running daemon), kind, kubectl, helm and internet access
# (base image, PyPI, the PyTorch CPU index). Run from anywhere: e2e/run.sh
#
# Environment:
#   E2E_CLUSTER         kind cluster name                  (disagfusion-e2e)
#   E2E_NAMESPACE       namespace of the test pipeline     (disagfusion-e2e)
#   E2E_WORKER_IMAGE    worker image tag to build          (disagfusion-worker:e2e)
#   E2E_OPERATOR_IMAGE  operator image tag to build        (disagfusion-operator:e2e)
#   E2E_READY_TIMEOUT   seconds to wait for Ready          (900)
#   E2E_KEEP=1          keep the cluster, namespace and pipeline afterwards
#   E2E_SKIP_BUILD=1    reuse images already built under those tags
#   PYTHON              python with pytest and pyyaml      (.venv/bin/python, from `make install`)
#   HELM                helm binary                        (helm on PATH, else .venv/bin/helm
#                                                           from `make helm`)
set -euo pipefail

cd "$(dirname "$0")/.."

CLUSTER=${E2E_CLUSTER:-disagfusion-e2e}
NAMESPACE=${E2E_NAMESPACE:-disagfusion-e2e}
WORKER_IMAGE=${E2E_WORKER_IMAGE:-disagfusion-worker:e2e}
OPERATOR_IMAGE=${E2E_OPERATOR_IMAGE:-disagfusion-operator:e2e}
READY_TIMEOUT=${E2E_READY_TIMEOUT:-900}
KEEP=${E2E_KEEP:-0}
PYTHON=${PYTHON:-.venv/bin/python}
HELM=${HELM:-$(command -v helm || echo .venv/bin/helm)}
RELEASE=disagfusion
OPERATOR_NAMESPACE=disagfusion-system

log() { printf '\n=== %s\n' "$*"; }
die() { echo "e2e: $*" >&2; exit 2; }

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
[ -x "$HELM" ] || die "helm is required (on PATH, or \`make helm\` for .venv/bin/helm)"
docker info >/dev/null 2>&1 || die "the docker daemon is not reachable"
[ -x "$PYTHON" ] || die "$PYTHON not found: run \`make install\` first or set PYTHON"
case "$OPERATOR_IMAGE" in
  *:*) ;;
  *) die "E2E_OPERATOR_IMAGE needs an explicit tag (repository:tag)" ;;
esac
case "$WORKER_IMAGE" in
  *:*) ;;
  *) die "E2E_WORKER_IMAGE needs an explicit tag (repository:tag)" ;;
esac

# A kubeconfig of our own: the user's contexts are never touched.
KUBECONFIG_FILE=$(mktemp "${TMPDIR:-/tmp}/disagfusion-e2e-kubeconfig.XXXXXX")
export KUBECONFIG=$KUBECONFIG_FILE
created_cluster=0

dump_diagnostics() {
  log "diagnostics"
  kubectl get dfp,statefulsets,deployments,pods,services -A -o wide || true
  kubectl -n "$NAMESPACE" describe dfp || true
  kubectl -n "$OPERATOR_NAMESPACE" logs deployment/"$RELEASE"-operator --tail=200 || true
  kubectl -n "$NAMESPACE" get events --sort-by=.lastTimestamp | tail -n 50 || true
}

teardown() {
  status=$?
  if [ "$status" -ne 0 ]; then
    dump_diagnostics
  fi
  if [ "$KEEP" = 1 ]; then
    log "keeping kind cluster $CLUSTER (KUBECONFIG=$KUBECONFIG_FILE)"
  else
    if [ "$created_cluster" = 1 ]; then
      log "deleting kind cluster $CLUSTER"
      kind delete cluster --name "$CLUSTER" || true
    fi
    rm -f "$KUBECONFIG_FILE"
  fi
  exit "$status"
}
trap teardown EXIT

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "reusing kind cluster $CLUSTER (it is left in place afterwards)"
  kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
else
  log "creating kind cluster $CLUSTER"
  created_cluster=1
  kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 180s
fi
kubectl cluster-info

if [ "${E2E_SKIP_BUILD:-0}" != 1 ]; then
  log "building $WORKER_IMAGE and $OPERATOR_IMAGE"
  docker build -f worker/Dockerfile -t "$WORKER_IMAGE" .
  docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
fi
log "loading the images into kind"
kind load docker-image --name "$CLUSTER" "$WORKER_IMAGE" "$OPERATOR_IMAGE"

log "installing the chart (release $RELEASE in $OPERATOR_NAMESPACE)"
"$HELM" upgrade --install "$RELEASE" charts/disagfusion \
  --namespace "$OPERATOR_NAMESPACE" --create-namespace \
  --set image.repository="${OPERATOR_IMAGE%:*}" \
  --set image.tag="${OPERATOR_IMAGE##*:}" \
  --set image.pullPolicy=Never \
  --set workerImage.repository="${WORKER_IMAGE%:*}" \
  --set workerImage.tag="${WORKER_IMAGE##*:}" \
  --wait --timeout 5m
kubectl wait crd/diffusionpipelines.disagfusion.io --for=condition=Established --timeout=60s
kubectl -n "$OPERATOR_NAMESPACE" rollout status deployment/"$RELEASE"-operator --timeout=180s

log "running the e2e tests"
# The example runs unchanged (no spec.image): the chart's workerImage, checked by the tests.
env -u E2E_WORKER_IMAGE \
  DISAGFUSION_E2E=1 \
  E2E_NAMESPACE="$NAMESPACE" \
  E2E_DEFAULT_WORKER_IMAGE="$WORKER_IMAGE" \
  E2E_READY_TIMEOUT="$READY_TIMEOUT" \
  E2E_KEEP="$KEEP" \
  "$PYTHON" -m pytest e2e -m e2e -v -p no:cacheprovider "$@"
log "e2e passed"
