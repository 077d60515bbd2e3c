# dynvol: make setup | tools | lint | test | demo | sanity | bench-*
# (KUBERNETES_VERSION=vX.Y.Z make tools tools-node builds another pinned Kubernetes release
# into .tools/bin; see hack/tools/build.sh.)
# Every target installs what it needs first; a second run reuses what is there.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools/bin
PYTEST_ARGS ?=
# The Kubernetes releases the integration tier runs against, newest (the default) first;
# from hack/tools/versions.env.
KUBERNETES_VERSIONS := $(shell bash hack/tools/build.sh --versions)
KUBERNETES_NEWEST := $(firstword $(KUBERNETES_VERSIONS))

.PHONY: setup tools tools-node tools-oldest tools-e2e lint format protos test test-unit test-integration test-e2e test-multinode test-upstream \
        sanity bench bench-csi bench-dmp bench-controllers bench-e2e bench-plots demo images cluster-up \
        cluster-down cluster-status e2e-kind clean \
        tools-helm chart-crds docs-images

setup:
	@bash hack/setup.sh

tools: setup
	@bash hack/tools/build.sh etcd kubernetes csi-sanity minio helm

# Only the Helm client (charts/dynvol's tests and helm install).
tools-helm: setup
	@bash hack/tools/build.sh helm

tools-node: setup
	@bash hack/tools/build.sh kubernetes-node coredns

# kube-apiserver and kubectl of the oldest supported release, for the integration tier.
tools-oldest: setup
	@bash hack/tools/build.sh kubernetes-oldest

# The upstream e2e suite's binary (e2e.test); nothing in `make test` needs it yet.
tools-e2e: setup
	@bash hack/tools/build.sh kubernetes-e2e

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict dynvol_core dynvol_providers dynvol_kube dynvol_csi dynvol_controllers dynvol_dmp dynvol
	$(VENV)/bin/lint-imports
	@if [ -x hack/gen-protos.sh ]; then bash hack/gen-protos.sh --check; fi

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: setup
	bash hack/gen-protos.sh

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The integration tier once per supported Kubernetes release (DYNVOL_KUBERNETES_VERSION
# picks the apiserver and kubectl of .tools/k8s/<version>/bin).
test-integration: tools tools-oldest
	@for v in $(KUBERNETES_VERSIONS); do \
	  echo "== integration tier on Kubernetes $$v"; \
	  DYNVOL_KUBERNETES_VERSION=$$v $(PY) -m pytest tests/integration $(PYTEST_ARGS) || exit $$?; \
	done

# The README's test command: lint; the unit and integration tiers on the newest supported
# Kubernetes release, then the integration tier on the oldest, then csi-sanity (lane api);
# the e2e tier on a real single-node cluster, then the three-node file, then Kubernetes' own
# storage suite (lane nodes). The builds run one at a time at low priority, and each lane
# starts as soon as what it needs is built, beside the other (dynvol/testing/lanes.py; each
# test step in mount and PID namespaces of its own, so its leak check sees only itself).
# LANES_ARGS=--serial runs one step at a time; LANES_ARGS='--only e2e-upstream' one step and
# what it needs; `$(PY) -m dynvol.testing.lanes --list` prints the plan.
LANES_ARGS ?=
CLUSTER_LOCK ?= /tmp/dynvol-cluster.lock
test: setup
	$(PY) -m dynvol.testing.lanes --cluster-lock $(CLUSTER_LOCK) $(LANES_ARGS) -- $(PYTEST_ARGS)

# A real single-node cluster (etcd, apiserver, controller-manager, scheduler, kubelet,
# containerd, runc) on this machine; see docs/local-cluster.md.
images: setup
	$(PY) hack/images/build.py build

cluster-up: tools tools-node
	hack/local-cluster up

cluster-down:
	hack/local-cluster down

cluster-status:
	hack/local-cluster status

test-e2e: tools tools-node
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# Three real nodes (dynvol.testing.cluster) under the machine's cluster lock; docs/local-cluster.md.
# One local cluster at a time on a machine: the targets that start one take CLUSTER_LOCK
# (set above, with the test target).
test-multinode: tools tools-node
	DYNVOL_MULTINODE_E2E=1 flock $(CLUSTER_LOCK) $(PY) -m pytest tests/e2e/test_multinode.py $(PYTEST_ARGS)

# Kubernetes' own storage e2e suite (e2e.test, External Storage) for dynvol's CSI driver on
# three real nodes, under the cluster lock; docs/upstream-e2e.md. Reports in _out/upstream.
test-upstream: tools tools-node tools-e2e
	DYNVOL_UPSTREAM_E2E=1 flock $(CLUSTER_LOCK) $(PY) -m pytest tests/e2e/test_upstream.py -s $(PYTEST_ARGS)

sanity: tools
	bash hack/sanity.sh

# Each benchmark prints every figure beside its goal and merges its figures into
# bench/results/latest.json (bench/goals.py); `make bench` runs them all, then draws the
# plots of docs/benchmarks.md into docs/images/benchmarks/. bench-e2e uses the one local
# cluster of the machine, under the same lock (CLUSTER_LOCK) as test-multinode.

bench-csi: tools
	$(PY) bench/bench_csi.py

bench-dmp: tools
	$(PY) bench/bench_dmp.py

bench-controllers: tools
	$(PY) bench/bench_controllers.py

bench-e2e: tools tools-node
	flock $(CLUSTER_LOCK) $(PY) bench/bench_e2e.py --claims 20 --repairs 5

bench-plots: setup
	$(PY) bench/plots.py

bench: bench-csi bench-dmp bench-controllers bench-e2e
	@$(MAKE) --no-print-directory bench-plots

# The seed story on a real single-node cluster on this machine (root; see docs/quickstart.md).
demo: setup
	hack/demo $(DEMO_ARGS)

# For users with Docker and kind (not runnable on machines without a container engine).
e2e-kind:
	kind create cluster --config hack/kind/cluster.yaml
	docker build -t dynvol/dynvol:dev .
	kind load docker-image dynvol/dynvol:dev --name dynvol
	kubectl --context kind-dynvol apply -k manifests/overlays/kind
	kubectl --context kind-dynvol -n dynvol-system rollout status ds/dynvol-node --timeout=300s
	kubectl --context kind-dynvol -n dynvol-system rollout status deploy/dynvol-controller --timeout=300s

# docs/images/*.svg from their Graphviz sources in docs/images/src (needs dot: Debian's
# graphviz); tests/unit/test_docs_images.py checks that they are current.
# Graphviz only for this target (the tests check the SVGs against their sources' hashes).
docs-images: setup
	@command -v dot >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends graphviz >/dev/null; }
	$(PY) docs/images/render.py

# charts/dynvol/crds from the CRDs of manifests/base (Helm never templates crds/).
chart-crds: tools
	$(PY) charts/sync-crds.py --kubectl $(TOOLS)/kubectl

clean:
	rm -rf .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis
