# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first, installing
# through constraints.txt so that no dependency can pull a CUDA build of torch onto a CPU machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

.PHONY: install demo test test-fast bench
install: $(VENV)/.installed

demo: install
	$(BIN)/fmrisynth demo

test: install
	$(BIN)/python -m pytest

# the edit-run loop: everything but the tests marked slow (they train, sample, evaluate or spawn processes)
test-fast: install
	$(BIN)/python -m pytest -m "not slow" -q

bench: install
	$(BIN)/python benchmarks/data_throughput.py
