#!/usr/bin/env bash
# The transport checks that need a GPU (issue #12), as one short script for a
# lent device machine: run from the repository root with the venv carried
# (`make install` first; nixl-cu12 is in the `all` extra).
#   tools/gpu_transport_check.sh [OUT_DIR]
# Writes bench JSON and the gpu-marked test results to OUT_DIR (default $OUT or .).
set -uo pipefail
out="${1:-${OUT:-.}}"
py=.venv/bin/python
nvidia-smi -L | tee "$out/gpus.txt"
# torch (NCCL between different GPUs; gloo through the host where both ends
# share one GPU, which NCCL refuses) and nixl with VRAM, 64 MiB and 512 MiB.
timeout 300 $py -m disagfusion bench transport --json --device cuda \
  --sizes 64MiB,512MiB --backends torch,nixl --iterations 8 > "$out/bench-cuda.json"
echo "bench exit $?"
timeout 240 $py -m pytest -q -m gpu -p no:cacheprovider \
  tests/worker/test_transport_torch.py tests/worker/test_transport_nixl.py \
  > "$out/gpu-tests.txt" 2>&1
echo "gpu tests exit $?"
tail -3 "$out/gpu-tests.txt"
