# Two entry points: `make quickstart` (the whole pipeline on a tiny model and the demo data) and `make test`.
PYTHON ?= python3

.PHONY: install quickstart test test-quick

# Idempotent: torch first (a CPU build where the machine provides one), then this package with test deps.
install:
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]"

quickstart: install
	bash examples/quickstart.sh

test: install
	$(PYTHON) -m pytest -q

test-quick: install
	$(PYTHON) -m pytest -q -m "not distributed and not shared_data"
