# fedsite: `make demo` then `make test` on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit venv clean wheelhouse bench e2e-docker mutation e2e-flower

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
	$(VENV)/bin/ruff check agent coordinator benchmarks integrations tests
	$(VENV)/bin/ruff format --check agent coordinator benchmarks integrations tests
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q -m "not docker and not flower" $(PYTEST_ARGS)

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

# Flower side (integrations/flower): its own venv, flwr pinned, no torch (flwr pins FastAPI,
# Starlette, uvicorn and cryptography differently from the agent). Three agents, a SuperLink and
# three SuperNodes on 127.0.0.1 (insecure: loopback only), two FedAvg rounds with `flwr run`,
# audit and Dice checks, a manual-approval run; prints JSON (round time vs `fedsite coordinate`,
# bytes per round). The tests marked `flower` run it when .venv-flower exists.
FLOWER_VENV := .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.installed
$(FLOWER_STAMP): integrations/flower/pyproject.toml
	@test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install -q flwr==1.42.0
	$(FLOWER_VENV)/bin/python -m pip install -q -e ./integrations/flower
	@if $(FLOWER_VENV)/bin/python -m pip show torch >/dev/null 2>&1; then \
	  echo "torch was pulled into $(FLOWER_VENV); the Flower side must not need it"; exit 1; fi
	touch $(FLOWER_STAMP)

e2e-flower: $(STAMP) $(FLOWER_STAMP)
	$(PY) integrations/flower/e2e.py --out build/flower-e2e

clean:
	rm -rf $(VENV) demo-out bench-out mutants .pytest_cache .mypy_cache .ruff_cache
