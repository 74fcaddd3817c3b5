# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all check setup clean

setup: $(STAMP)

# torch is pinned to the CPU wheel that lies on this disk *before* the package is installed,
# so that the package's torch range is already satisfied and no CUDA build is pulled.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/asyncdiff-partition demo

# Two pytest workers, one per core, each test file on one worker (its module fixtures built
# once); ranks start from a fork server that imported torch once (tests/conftest.py). 13 min -> 6.
test: check
	$(PY) -m pytest -q -n 2 --dist loadfile

# Also the slow tests (full-size models, 2-rank runs of every pipeline family).
test-all: check
	ASYNCDIFF_SLOW=1 $(PY) -m pytest -q -n 2 --dist loadfile

# Static checks, run by `make test` (and so by CI): lint and import order, then types
# (strict on the torch-free core, normal elsewhere; settings in pyproject.toml).
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy asyncdiff_partition cli

clean:
	rm -rf $(VENV) build *.egg-info
