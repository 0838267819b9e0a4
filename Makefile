# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
RUN    ?= runs/demo

.PHONY: install demo test test-fast test-slow bench clean

install: $(STAMP)

# torch is installed first and pinned: the CPU wheel 2.13.0. Any looser spec lets pip fetch the
# newest CUDA build (several GB). Everything else then sees torch as already satisfied.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The embedded default: MiniLM + LoRA on the shipped sentiment set, then merge and evaluate.
# Re-runnable: each step replaces its own earlier output (and nothing else) on a second run.
demo: install
	$(BIN)/lorafit train output_dir=$(RUN) overwrite=true
	$(BIN)/lorafit merge $(RUN) $(RUN)-merged --overwrite
	$(BIN)/lorafit eval $(RUN)-merged data=sentiment_demo output_dir=$(RUN)-eval overwrite=true

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python scripts/bench_adapters.py

clean:
	rm -rf $(VENV) runs .pytest_cache
