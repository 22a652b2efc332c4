# The two commands of a fresh machine:  `make repro` (the whole pipeline)  and  `make test`.
# Both create .venv when missing and install the project into it; both are safe to repeat.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: install repro sweep test test-slow test-all lint bench ui

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

repro: $(STAMP)  ## the demo pipeline on the embedded default: params, prepare -> pretrain -> evals -> pictures, report
	$(BIN)/dvc repro params report pictures

sweep: $(STAMP)  ## the masking ablations on Ray Tune (tune: section of params.yaml)
	$(BIN)/dvc repro sweep

test: $(STAMP)  ## the default test suite (exit 5, "no tests collected", counts as a failure)
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: $(STAMP)  ## only the tests marked slow: fault injection (worker / driver kill, NaN stop, 2 nodes), S3, sweeps
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)  ## every test, the slow ones included
	$(BIN)/python -m pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)  ## each benchmark prints one JSON object
	@set -e; for f in $$(ls benchmarks/*.py 2>/dev/null); do echo "# $$f" >&2; $(BIN)/python $$f; done

ui: $(STAMP)  ## MLflow UI on the embedded store, loopback only: http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --workers 1 --backend-store-uri sqlite:///$(abspath mlflow.db) \
	  --default-artifact-root $(abspath mlartifacts) --host 127.0.0.1 --port 5000
