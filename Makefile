# Partita: `make demo` runs the main job on the embedded local cluster,
# `make test` runs the whole suite. Both install what they need first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= python3
CACHE ?= $(HOME)/.cache/partita
VENV := .venv
UV := $(CACHE)/uv/bin/uv
BIN := $(VENV)/bin
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
export UV_PYTHON := $(shell command -v $(PY))
export PARTITA_CACHE := $(CACHE)

.PHONY: install system-deps venv testbed-bin test lint typecheck crds crds-check dashboards dashboards-check protos unit integration e2e demo bench clean

install: system-deps venv testbed-bin

# Prometheus and promtool come from Debian; iproute2 gives `ip netns` and tc
# for shaping links in the local cluster.
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v tc >/dev/null; then \
	  echo "==> installing Debian packages: prometheus iproute2"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus iproute2 >/dev/null; \
	fi

$(UV):
	@echo "==> installing uv into $(CACHE)/uv"
	$(PY) -m venv $(CACHE)/uv
	$(CACHE)/uv/bin/pip install --quiet --disable-pip-version-check uv==0.13.8

venv: $(UV)
	@echo "==> syncing .venv from uv.lock"
	$(UV) sync --frozen --all-extras

testbed-bin: venv
	@$(BIN)/partita testbed install

lint: venv
	@echo "==> ruff"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@echo "==> import-linter"
	$(BIN)/lint-imports

typecheck: venv
	@echo "==> mypy"
	$(BIN)/mypy

crds: venv
	$(BIN)/partita crds --out crds --chart charts/partita/crds

crds-check: venv
	@echo "==> checking that crds/ and the chart's CRDs are regenerated"
	$(BIN)/partita crds --check --out crds --chart charts/partita/crds

dashboards: venv
	$(BIN)/partita dashboards --out charts/partita/dashboards

dashboards-check: venv
	@echo "==> checking that the chart's Grafana dashboards are regenerated"
	$(BIN)/partita dashboards --check --out charts/partita/dashboards

# The v2 gRPC stubs of the inference server, generated from its .proto (checked in;
# tests/unit/server checks they match what protoc writes today).
PROTO_SRC := inference-server/src
protos: venv
	$(BIN)/python -m grpc_tools.protoc -I $(PROTO_SRC) --python_out=$(PROTO_SRC) \
	  --pyi_out=$(PROTO_SRC) partita_server/proto/open_inference.proto

unit: venv
	$(BIN)/pytest tests/unit -q

test: install lint typecheck crds-check dashboards-check
	@echo "==> pytest (unit, integration, e2e)"
	$(BIN)/pytest tests -q

demo: install
	$(BIN)/partita demo

bench: install
	$(BIN)/python bench/run.py

clean:
	-$(BIN)/partita testbed down
	rm -rf $(VENV)
