# Sidecar: every target sets up what it needs from a bare machine with python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test test-slow lint bench bench-gpu bench-methods serve clean

$(STAMP): pyproject.toml requirements-offline.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,ray]'
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m bench.head_cost
	$(PY) -m bench.fan_out
	$(PY) -m bench.serve_load

# GPU figures (needs CUDA): backbone throughput, kernel time, fan-out; a few minutes.
bench-gpu: $(STAMP)
	$(PY) -m bench.gpu

# Trains every method on one synth task (tens of minutes on 2 CPU cores); prints the comparison table.
bench-methods: $(STAMP)
	$(PY) -m bench.methods

# Trains the demo tasks on first start (a few minutes, with progress), then serves on localhost:8000.
serve: $(STAMP)
	$(PY) -m server.demo --store-dir store
	$(PY) -m server.main --store-dir store --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
