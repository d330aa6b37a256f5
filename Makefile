# stable-align: two commands on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/stablealign/v1/*.proto)
PROTO_OUT := stablealign/v1
PYTEST_ARGS ?=
RUN_OUT ?= runs/default
# llama-cpp-python (extra `llamacpp`: llama.cpp's OpenAI-compatible server for tests and bench) has no
# Linux wheels on PyPI, so pip builds it (once; then pip's wheel cache): CPU only, portable AVX2 rather
# than -march=native, no BLAS, no multimodal library, no llama.cpp "common" library (unused by Python).
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF \
	-DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/bench/llamacpp-skip-common.cmake

.PHONY: dashboard images nats-config install proto run study test test-unit test-integration bench bench-sim bench-scale bench-train bench-hf bench-llamacpp bench-real chaos attack lint clean

install: $(STAMP) $(PROTO_OUT)/.generated

# torch first, pinned, so that pip takes the CPU build on disk instead of a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) install -q -e '.[all,dev,llamacpp]'
	touch $(STAMP)

# Generated protobuf/gRPC code is git-ignored and made here (and at install).
proto: $(PROTO_OUT)/.generated
$(PROTO_OUT)/.generated: $(PROTO_SRC) $(STAMP)
	rm -rf $(PROTO_OUT) && mkdir -p $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC)
	touch $(PROTO_OUT)/__init__.py $(PROTO_OUT)/.generated

# The whole pipeline on the embedded default with a real model (SmolLM2-135M-Instruct from its PyPI
# package): nats-server + services -> records -> alignment data -> Stable Alignment training of that
# model on the CPU -> eval report (base vs trained). `stable-align pipeline --backend offline` is the
# one-minute tour with stand-ins.
run: install
	$(VENV)/bin/stable-align pipeline --out $(RUN_OUT)

# The method on a society large enough to carry signal (8x8 SmolLM2 agents x 4 rounds = 256
# interactions), with the paper's ablation (SFT-only on the same data) and the human-data reference
# (SFT on the HH-RLHF prior split), evaluated on all 679 held-out pairs and 64 held-out questions.
STUDY_OUT ?= runs/study
STUDY_ARGS ?= --size 8 --rounds 4 --train-steps 64 --eval-limit 679 --questions 64 --ablation --eval-bf16
study: install
	$(VENV)/bin/stable-align pipeline --out $(STUDY_OUT) $(STUDY_ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

bench: bench-sim bench-train bench-hf bench-llamacpp

bench-sim: install
	$(PY) -m bench.simulation

# 1,024 and 10,000 agents for one round through NATS (BENCH_SCALE_ARGS=--full adds 100,489: ~20 min on 2 cores).
bench-scale: install
	$(PY) -m bench.scale $(BENCH_SCALE_ARGS)

# One fault per row on loopback (kill -9 of each service, NATS restart, LLM errors/hang, killed training),
# records counted by an independent reader; BENCH_CHAOS_ARGS=--write-docs rewrites docs/reliability.md.
chaos: install
	$(PY) -m bench.chaos $(BENCH_CHAOS_ARGS)

# Every attack route of docs/security-attacks.md, as each role, against a real nats-server with the generated
# accounts and users and real services on loopback (also part of `make test`).
attack: install
	$(PY) -m pytest -q tests/integration/test_attacks.py tests/integration/test_attacks_trainer.py tests/unit/test_grpc_authz.py tests/unit/test_k8s_nats_routes.py $(PYTEST_ARGS)

bench-train: install
	$(PY) -m bench.training

bench-hf: install
	$(PY) -m bench.hf_batching

bench-llamacpp: install
	$(PY) -m bench.llamacpp

# The society on SmolLM2 (3x3 and 8x8 worlds) against the model's own forward passes on this machine;
# BENCH_REAL_ARGS="--engines --llamacpp --baseline-src DIR" adds the engines and a checkout to compare with.
bench-real: install
	$(PY) -m bench.real_model $(BENCH_REAL_ARGS)

# The service and trainer images, tagged as the kustomize overlays name them (deploy/k8s/overlays/*:
# images:). REGISTRY=ghcr.io/you make images; then docker push both and set images: in your overlay.
REGISTRY ?= ghcr.io/stable-align
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
SHARED ?= ../shared
images:
	docker build -f deploy/docker/Dockerfile --build-context shared=$(SHARED) --target service \
		-t $(REGISTRY)/stablealign:$(VERSION) .
	docker build -f deploy/docker/Dockerfile --build-context shared=$(SHARED) --target trainer \
		-t $(REGISTRY)/stablealign-trainer:$(VERSION) .

# The Grafana dashboard from code (deploy/grafana/dashboard.py); a test fails when the JSON is stale.
dashboard:
	python3 deploy/grafana/dashboard.py

# The NATS users and permissions (stablealign/nats/permissions.py) as the nats-server config k8s mounts;
# a test fails when the committed file is stale.
nats-config: install
	$(PY) -m stablealign.nats.permissions --out deploy/k8s/base/nats-auth.conf

lint: install
	$(VENV)/bin/ruff check stablealign stablealign_app services tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(PROTO_OUT) .pytest_cache runs
