# The two commands: `make demo` runs the pipeline on the embedded local stack; `make test` runs the tests.
# Both create .venv and install the pinned dependencies first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint validate-manifests check-crd-schemas stack-up stack-down stack-status bench-features bench-serving bench-pit-join bench-online-write bench-scale bench-cycle bench-stack bench-imports bench-training train features clean-stack

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==24.3.1"
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sales_forecast.demo

features: $(STAMP)
	$(PY) 01_feast_features.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# manifests/ and every overlay, each with manifests/steps: strict schemas, CEL rules, NetworkPolicies, the contract.
validate-manifests: $(STAMP)
	$(PY) -m tools.manifests.validate

# Regenerating the committed CRD schemas changes nothing (needs the pinned CRDs: CRDS=path, default ../shared/crds).
CRDS ?= ../shared/crds
check-crd-schemas: $(STAMP)
	$(PY) -m tools.manifests.crd_schemas --check $(CRDS)

stack-up: $(STAMP)
	$(PY) -m sales_forecast.stack up

stack-down: $(STAMP)
	$(PY) -m sales_forecast.stack down

stack-status: $(STAMP)
	$(PY) -m sales_forecast.stack status

bench-features: $(STAMP)
	$(PY) 01_feast_features.py

train: $(STAMP)
	$(PY) 02_training.py

bench-training: $(STAMP)
	$(PY) -m benchmarks.bench_training

bench-serving: $(STAMP)
	$(PY) -m benchmarks.bench_serving

bench-stack: $(STAMP)
	$(PY) -m benchmarks.bench_stack

bench-imports: $(STAMP)
	$(PY) -m benchmarks.bench_imports

bench-cycle: $(STAMP)
	$(PY) -m benchmarks.bench_cycle

bench-pit-join: $(STAMP)
	$(PY) -m benchmarks.bench_pit_join

# One online write's upsert into a 100x online table (SERIES=115830: 10x), against the statement before it.
SERIES ?= 1158300
bench-online-write: $(STAMP)
	$(PY) -m benchmarks.bench_online_write --series $(SERIES)

# Steps 1 and 2 at 10x the default rows with the whole machine's memory sampled (SCALE=100: how far it gets).
SCALE ?= 10
bench-scale: $(STAMP)
	$(PY) -m benchmarks.bench_scale --scale $(SCALE)

clean-stack: stack-down
	rm -rf .stack
