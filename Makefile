# A newcomer's two commands: `make serve` and `make test`. Each sets up .venv by itself; `make
# serve` installs only what serving needs, `make test` adds the development tools and the SDK.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.dev-installed

# The delivery queue (the hot structure) compiled with mypyc by setup.py: ~2x the pure-Python
# speed. Rebuilt in place whenever its source changes; if the compiler fails, the pure-Python
# module is used instead. The installs below skip it (FLEET_BROKER_PURE): this target builds it.
COMPILED := projections/.delivery.compiled
PURE := FLEET_BROKER_PURE=1

.PHONY: serve test lint bench clean compile

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PURE) $(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) sdk/python/pyproject.toml
	$(PURE) $(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e sdk/python
	touch $(DEV_STAMP)

$(COMPILED): projections/delivery.py | $(STAMP)
	rm -f projections/delivery*.so
	$(BIN)/python -m pip install --verbose --no-deps -e . >build-mypyc.log 2>&1 || true
	@if ls projections/delivery*.so >/dev/null 2>&1; then \
	  echo "compiled projections/delivery.py with mypyc"; \
	else echo "mypyc failed (see build-mypyc.log): the pure-Python delivery queue is used"; fi
	touch $(COMPILED)

compile: $(COMPILED)

serve: $(STAMP) $(COMPILED)
	$(BIN)/broker serve

test: $(DEV_STAMP) $(COMPILED)
	$(BIN)/python -m pytest -q

# The side-by-side benchmark (bench/peers, docs/performance.md): its RabbitMQ client comes with
# the bench extra. RabbitMQ and NATS are the machine's own; one that does not answer is skipped.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(DEV_STAMP)
	$(PURE) $(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(COMPILED)
	$(BIN)/python -m bench.peers

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data build build-mypyc.log projections/*.so $(COMPILED)
