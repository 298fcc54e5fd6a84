# A newcomer's two commands: `make serve` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The delivery queue (the hot structure) compiled with mypyc: ~2x the pure-Python speed. Rebuilt
# whenever its source changes; if the compiler fails, the pure-Python module is used instead.
COMPILED := projections/.delivery.compiled

.PHONY: serve test lint bench clean compile console-assets

$(STAMP): pyproject.toml sdk/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e sdk/python
	touch $(STAMP)

$(COMPILED): projections/delivery.py $(STAMP)
	rm -f projections/delivery*.so
	$(BIN)/mypyc projections/delivery.py >build-mypyc.log 2>&1 \
	  && touch projections/delivery*.so && echo "compiled projections/delivery.py with mypyc" \
	  || { rm -f projections/delivery*.so; echo "mypyc failed (see build-mypyc.log): the pure-Python delivery queue is used"; }
	touch $(COMPILED)

compile: $(COMPILED)

serve: $(STAMP) $(COMPILED)
	$(BIN)/broker serve

test: $(STAMP) $(COMPILED)
	$(BIN)/python -m pytest -q

# The side-by-side benchmark (bench/peers, docs/performance.md): its RabbitMQ client comes with
# the bench extra. RabbitMQ and NATS are the machine's own; one that does not answer is skipped.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(COMPILED)
	$(BIN)/python -m bench.peers

# The operator console's libraries (htm+Preact, uPlot), fetched again from the npm registry into
# broker/console_static/vendor (committed: `make serve` needs neither npm nor the network).
console-assets:
	broker/console_static/vendor/fetch.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data build build-mypyc.log projections/*.so $(COMPILED)
