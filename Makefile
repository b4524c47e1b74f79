# apex-orch: two commands for a newcomer —
#   make quantize PROFILE=compact   (APEX-quantize the embedded demo model, or MODEL=...)
#   make test                       (everything the CI runs)
# Both set up what they need: a virtualenv (.venv unless one is active), the pinned
# llama.cpp built once into the user cache, the bindings against that same libllama.

SHELL := /bin/bash
.DEFAULT_GOAL := help

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
PYTHON := $(VENV)/bin/python
APEX := $(VENV)/bin/apex-orch
STAMP_DIR := $(VENV)/.apex-orch
BOOT_PYTHON ?= python3

PROFILE ?= compact
MODEL ?=
IMATRIX ?=
OUT ?= out
CORPUS ?= agentic
RELEASE ?= releases/demo.yaml
JOBS ?=
PYTEST_ARGS ?=
# Extra CMake flags for your own build, e.g. LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON"; each set of
# flags gets its own build folder in the cache and becomes the build apex-orch uses.
LLAMA_CMAKE_ARGS ?=

.PHONY: help venv llama bindings install install-archs install-ray bench-distributed quantize imatrix release lint test test-archs test-fast bench bench-quality bench-fit reference-model demo-model doctor clean

help:
	@echo "make quantize PROFILE=compact [MODEL=path.gguf] [IMATRIX=file] [OUT=dir]"
	@echo "make imatrix CORPUS=agentic [MODEL=path.gguf]"
	@echo "make release RELEASE=releases/demo.yaml [PUSH=1] [JOBS=N]"
	@echo "make test | make lint | make test-archs | make bench | make bench-quality | make bench-fit | make reference-model | make demo-model | make doctor"

$(PYTHON):
	$(BOOT_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip

venv: $(PYTHON)

# The pinned llama.cpp (llama-cpp-python 0.3.36's vendored tree), built once per pin (and per
# LLAMA_CMAKE_ARGS) into the cache (~/.cache/apex-orch, or $$APEX_ORCH_CACHE); vendor/llama.cpp
# links to it. Standard library only: runs before installs. `apex-orch build` runs the same code.
llama: $(PYTHON)
	LLAMA_CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PYTHON) -m apex_orch.llama.build llama

$(STAMP_DIR)/bindings: | $(PYTHON)
	$(PYTHON) -m apex_orch.llama.build bindings
	@mkdir -p $(STAMP_DIR) && touch $@

bindings: llama $(STAMP_DIR)/bindings

$(STAMP_DIR)/install: pyproject.toml | $(PYTHON)
	$(MAKE) --no-print-directory bindings
	$(PYTHON) -m pip install -q -e ".[test,plot]"
	@mkdir -p $(STAMP_DIR) && touch $@

install: llama $(STAMP_DIR)/install

doctor: install
	$(APEX) doctor

quantize: install
	$(APEX) quantize --profile $(PROFILE) $(if $(MODEL),"$(MODEL)",--demo) \
	  $(if $(IMATRIX),--imatrix "$(IMATRIX)") --out-dir "$(OUT)" $(if $(JOBS),-j $(JOBS))

imatrix: install
	$(APEX) imatrix $(if $(MODEL),"$(MODEL)",--demo) --corpus $(CORPUS)

release: install
	$(APEX) release "$(RELEASE)" $(if $(JOBS),-j $(JOBS)) $(if $(filter 1,$(PUSH)),--push)

# The `archs` extra (transformers + the CPU torch on local disk) for tests/archs, the real-converter
# matrix: tiny checkpoints of ~30 MoE architectures converted by the pinned convert_hf_to_gguf.py.
# `make test` runs it with the rest; `make test-archs` runs it alone.
$(STAMP_DIR)/archs: pyproject.toml $(STAMP_DIR)/install
	$(PYTHON) -m pip install -q -e ".[test,plot,archs]"
	@touch $@

install-archs: install $(STAMP_DIR)/archs

# The `ray` extra for `release --executor ray` and tests/ray (a real cluster on 127.0.0.1).
$(STAMP_DIR)/ray: pyproject.toml $(STAMP_DIR)/install
	$(PYTHON) -m pip install -q -e ".[test,plot,ray]"
	@touch $@

install-ray: install $(STAMP_DIR)/ray

bench-distributed: install-ray
	$(PYTHON) bench/bench_distributed.py

# ruff (pyflakes + pycodestyle, 120 columns) and mypy (strict on core, model, plan); `make test` runs it first.
lint: install
	$(PYTHON) -m ruff check apex_orch tests bench tools
	$(PYTHON) -m mypy

test: install-archs install-ray
	$(MAKE) --no-print-directory lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-archs: install-archs
	$(PYTHON) -m pytest tests/archs $(PYTEST_ARGS)

bench: install
	$(PYTHON) bench/run_all.py

bench-quality: install
	$(PYTHON) bench/bench_quality.py

bench-fit: install
	$(PYTHON) bench/bench_fit.py

reference-model: install
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) bench/reference_model/train.py

# The demo model's committed vocabulary and build record (apex_orch/demo/demo-tokenizer.json,
# demo-model.json): a BPE trained with `tokenizers` (the archs extra), then one build as a first use
# makes it (numpy). `make quantize` itself needs neither: it trains the demo from these on first use.
demo-model: install-archs
	$(PYTHON) -m bench.reference_model.demo

clean:
	rm -rf out .pytest_cache
