# fedsite: `make demo` then `make test` on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit venv clean wheelhouse bench e2e-docker mutation

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

# Mutation testing of the codec, the egress gate, the audit chain, tokens and approvals (see
# [tool.mutmut] in pyproject.toml and the README). Not part of `make test`: it takes tens of
# minutes. MUTANTS selects some, e.g. MUTANTS='agent.audit.chain*'; scores per module are in
# mutants/mutmut-cicd-stats.json and `$(VENV)/bin/mutmut results` lists the survivors.
MUTMUT_JOBS ?= 2
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,mutation]'
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children $(MUTMUT_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut export-cicd-stats
	@echo "Killed (timeouts count as killed) of the mutants checked, per module:"
	@$(VENV)/bin/mutmut results --all true | sed -E 's/^ *//; s/\.x[^.]*__mutmut_[0-9]+: / /' | awk \
	  '{ m = $$1; $$1 = ""; st = substr($$0, 2); if (st == "not checked" || st == "skipped") next; \
	     n[m]++; if (st == "killed" || st == "timeout" || st == "caught by type check") k[m]++ } \
	   END { for (m in n) printf "  %-26s %4d / %4d  %5.1f%%\n", m, k[m], n[m], 100 * k[m] / n[m] }' | sort

# Every wheel the image needs, for an offline `docker build` (TORCH_VARIANT=cpu|cuda).
TORCH_VARIANT ?= cpu
wheelhouse: $(STAMP)
	PYTHON=$(PY) bash docker/wheelhouse.sh wheelhouse $(TORCH_VARIANT)

# Engine, Debian base, image, three agents + coordinator over mutual TLS, audit checks, teardown.
e2e-docker: $(STAMP)
	PYTHON=$(PY) bash deploy/e2e-docker.sh

clean:
	rm -rf $(VENV) demo-out bench-out mutants .pytest_cache .mypy_cache .ruff_cache
