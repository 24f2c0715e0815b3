# churnguard: every target installs what it needs first, on a machine with only Python 3.11+ and make.

PYTHON ?= python3
TOOLS  := .tools
UV     := $(TOOLS)/bin/uv
VENV   := .venv
BIN    := $(VENV)/bin
# never let uv download an interpreter: use the machine's Python
export UV_PYTHON_DOWNLOADS := never

PYTEST_ARGS ?=
BENCH ?=

MODEL_WORLDS ?= .dev/model
DEFAULT_MODEL := services/scoring/src/churnguard/scoring/models/default.onnx

.PHONY: install demo test bench lint format schemas model clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check 'uv>=0.5,<0.14'

$(BIN)/churnguard: $(UV) pyproject.toml uv.lock libs/common/pyproject.toml services/*/pyproject.toml
	$(UV) sync --frozen --python $(PYTHON)
	@touch $@

install: $(BIN)/churnguard

## demo: the embedded stack and every service in the foreground; Ctrl-C stops it all
demo: install
	$(BIN)/churnguard dev run

## test: the whole suite on real brokers (Tansu, and Apache Kafka when java+mvn exist) and PostgreSQL
test: install
	$(BIN)/pytest $(PYTEST_ARGS)

## bench: every benchmark, or one with BENCH=<name>; figures merge into bench/results.json
bench: install
	$(BIN)/python -m bench $(if $(BENCH),--only $(BENCH),)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src libs/common/src services/ingest/src services/scoring/src services/playbooks/src services/notify/src
	$(BIN)/churnguard schemas check

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## schemas: regenerate the checked-in JSON Schemas from the event models
schemas: install
	$(BIN)/churnguard schemas export

## model: the shipped churn model, from scratch: simulate a training world (seed 1, 2,000
## accounts x 365 days) and a test world (seed 2, 545 days, tested from its second year on)
model: install
	$(BIN)/churnguard simulate --to $(MODEL_WORLDS)/world-seed1 --seed 1 --accounts 2000 --days 365 --no-parquet
	$(BIN)/churnguard simulate --to $(MODEL_WORLDS)/world-seed2 --seed 2 --accounts 2000 --days 545 --no-parquet
	$(BIN)/churnguard model train --train $(MODEL_WORLDS)/world-seed1 \
		--test $(MODEL_WORLDS)/world-seed2 --test-since 2026-01-01 --out $(DEFAULT_MODEL)

clean:
	-$(BIN)/churnguard dev down
	rm -rf .dev $(VENV) $(TOOLS)
