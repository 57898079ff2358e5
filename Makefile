# fedsite: `make demo` then `make test` on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit venv clean wheelhouse bench e2e-docker

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON) not found); set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch is installed first and by exact version so that no dependency resolves a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsite demo --out demo-out

lint: $(STAMP)
	$(VENV)/bin/ruff check agent coordinator benchmarks tests
	$(VENV)/bin/ruff format --check agent coordinator benchmarks tests
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q -m "not docker" $(PYTEST_ARGS)

test: lint typecheck unit

# Every wheel the image needs, for an offline `docker build` (TORCH_VARIANT=cpu|cuda).
TORCH_VARIANT ?= cpu
wheelhouse: $(STAMP)
	PYTHON=$(PY) bash docker/wheelhouse.sh wheelhouse $(TORCH_VARIANT)

# Engine, Debian base, image, three agents + coordinator over mutual TLS, audit checks, teardown.
e2e-docker: $(STAMP)
	PYTHON=$(PY) bash deploy/e2e-docker.sh

clean:
	rm -rf $(VENV) demo-out bench-out .pytest_cache .mypy_cache .ruff_cache
