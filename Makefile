# phi3-operator. `make demo` and `make test` work on a fresh machine: they install what is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp is keyed on pyproject.toml, so a dependency change reinstalls.
VENV_STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help setup system-packages venv binaries image-layers images lint test test-unit test-cluster test-serving test-chart demo demo-down bench cluster-up cluster-down clean

help:
	@echo "make demo        run the whole product on the local control plane"
	@echo "make test        install everything and run the full suite (lint, unit, cluster, serving, chart)"
	@echo "make bench       operator, runtime and real-node start benchmarks -> bench/results/*.json"
	@echo "make setup       create .venv and build the cached control-plane and node binaries"
	@echo "make images      build images/operator and images/mlserver-cpu with buildah, push to the local registry"
	@echo "make cluster-up / cluster-down   start or stop the local control plane"

# Cold, the Go builds keep both cores busy for most of setup; the venv, the debootstrap base and the
# images' layers are mostly downloads and unpacking, so they run beside them.
setup: system-packages
	@$(MAKE) --no-print-directory -j3 venv binaries image-layers

# Debian packages, as `command:package`: lua5.4 runs the Argo CD health check, openssl makes the
# cluster's certificates, buildah and debootstrap build the images; the real node needs runc, the
# CNI plugins, nft (kube-proxy's nftables mode and the node's forward rule) and ip; the NetworkPolicy
# tests' firewall (kube-router) needs ipset and iptables.
SYSTEM_TOOLS := lua5.4:lua5.4 openssl:openssl buildah:buildah debootstrap:debootstrap runc:runc \
	/usr/lib/cni/bridge:containernetworking-plugins nft:nftables ip:iproute2 ipset:ipset iptables:iptables
system-packages:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; package=$${pair##*:}; \
	  command -v $$tool >/dev/null || test -x $$tool || missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

venv: $(VENV_STAMP)

$(VENV_STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[operator,serving,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

binaries:
	hack/localcluster build

# The images the demo and the real-node tests push, built into buildah's layer cache (root only: buildah).
IMAGE_LAYERS := operator mlserver-cpu mlserver-torch-cpu mlflow
image-layers:
	@if [ "$$(id -u)" = 0 ]; then hack/images build --no-push $(IMAGE_LAYERS); \
	else echo "image-layers: not root, so no buildah: the images are built when the real node first needs them"; fi

# The registry the images are pushed to runs on the local cluster's node bridge.
images: setup cluster-up
	hack/images build

lint: venv
	$(BIN)/ruff check operator tests bench hack/*.py hack/localcluster hack/localcluster_lib hack/images
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-cluster: setup
	$(BIN)/pytest tests/cluster $(PYTEST_ARGS)

test-serving: venv
	$(BIN)/pytest tests/serving $(PYTEST_ARGS)

test-chart: setup
	$(BIN)/pytest tests/chart $(PYTEST_ARGS)

cluster-up: binaries
	@hack/localcluster up

cluster-down:
	@hack/localcluster down

demo: setup
	$(BIN)/python hack/demo.py

demo-down:
	$(BIN)/python hack/demo.py --down

bench: setup
	$(BIN)/python bench/operator_bench.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/cpu_peer.py
	$(BIN)/python bench/pyfunc_serving.py
	$(BIN)/python bench/realnode_start.py

clean: cluster-down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
