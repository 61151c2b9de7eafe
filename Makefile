# Quick start: `make demo` (the comparison table on the default packaged model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# WikiText-2 test split: a local copy (see README); CI and this workspace keep it in ../shared.
DATA ?= ../shared/data
TORCH ?= torch==2.13.0

.PHONY: install dev demo test lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# CPU torch only when torch is missing (the pinned file is on these machines' disk; pip never
# pulls a multi-GB CUDA build here), then the package with its lm-eval extra.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[eval]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[eval,dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

demo: install
	SPARSEALLOC_DATA=$(DATA) $(BIN)/sparsealloc compare --model smollm2-135m --sparsity 0.7 \
		--pruner wanda --allocations uniform,owl,owl+absorb,alpha,alpha+absorb \
		--nsamples 16 --seqlen 512 --eval-seqlen 1024 --eval-tokens 8192 \
		--absorb-nsamples 4 --out runs/demo

test: dev
	SPARSEALLOC_DATA=$(DATA) $(BIN)/python -m pytest -q

lint: dev
	$(BIN)/ruff check src tests bench tools

# Rewrite the tables the docs quote from their `sparsealloc table` commands (review the diff).
docs: dev
	$(BIN)/python tools/refresh_doc_tables.py

clean:
	rm -rf runs .pytest_cache
