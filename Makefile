# `make test` and `make demo` each create .venv when it is absent (torch pinned first, so pip
# takes the CPU build; then the package under the exact pins of constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The default suite skips the long and multi-process tests; CI runs with PYTEST_ARGS= (everything).
PYTEST_ARGS ?= -m "not slow and not distributed"

.PHONY: test demo clean

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
