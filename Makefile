# `make demo`: set up and run the built-in end-to-end demo.  `make test`: set up and run the test suite.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup demo test test-slow lint bench

# torch first, pinned, so that nothing pulls a multi-GB CUDA build on a CPU machine (skipped when torch exists).
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e '.[dev]'

demo: setup
	$(PYTHON) -m llm_attr demo --out demo_run

test: setup
	$(PYTHON) -m pytest -q

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

lint:
	$(PYTHON) -m ruff check llm_attr tests benchmarks recipes
