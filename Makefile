# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (if missing) and install the package with its extras at the
# exact versions in constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.keras-stability-installed
PYTEST_ARGS ?=
# The suite runs on 2 pytest-xdist workers, a test file per worker at a time
# (module fixtures train once): `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

.PHONY: demo test lint bench dist install clean

demo: $(STAMP)
	$(PY) -m keras_stability demo

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check keras_stability tests benchmarks
	$(PY) -m ruff format --check keras_stability tests benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks

# A wheel and an sdist of the package in dist/ (pip install dist/*.whl, or
# upload the wheel to Colab next to a notebook).
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .

install: $(STAMP)

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: '$(PYTHON)' was not found. Install Python 3.10 or newer (or run 'make PYTHON=/path/to/python3')."; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || { \
	  echo "error: keras-stability needs Python 3.10 or newer; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)."; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1 || { \
	  echo "error: '$(PYTHON) -m venv' is not available on this machine."; \
	  echo "       Install it first, e.g. 'apt-get install python3-venv' on Debian/Ubuntu,"; \
	  echo "       then run this command again."; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.cfg pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,notebooks,hub]"
	@touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
