# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install the pinned
# stack once; a stamp file makes a second run install nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: venv test lint demo bench bench-gpu clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest tests

lint: $(STAMP)  # rules in pyproject.toml; `$(VENV)/bin/ruff format .` fixes the formatting
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m apps.demo --out $(DEMO)

bench: $(STAMP)
	PYTHON=$(PY) bash bench/cpu_suite.sh

bench-gpu:  # on a GPU machine, with its own python3 (see bench/gpu.sh for offline machines)
	bash bench/gpu.sh

clean:
	rm -rf $(DEMO) build *.egg-info
