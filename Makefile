# jsoncache: a caching reverse proxy for JSON APIs.
#   make run    set up, then run Redis (reused or started), the upstream stub and the proxy
#   make run-cluster   the same on a local Redis Cluster (3 primaries, 3 replicas), two proxies
#   make test   set up, then run the tests (they start their own redis-server processes)
#   make lint   ruff and mypy          make bench   hits, misses, bytes stored vs a baseline
#   make conformance   the cache-tests.fyi suite against the proxy (needs node and npm)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2
# Run a second time on the embedded Valkey 9 (the first run uses redis-server when installed).
VALKEY_TESTS ?= tests/test_core.py tests/test_invalidation.py tests/test_faults.py \
	tests/test_cluster.py tests/test_sentinel.py tests/test_redis_security.py

.PHONY: setup run run-cluster test lint bench bench-purge bench-parsers bench-codecs bench-client bench-instructions bench-fastloop bench-gaps bench-bytes bench-steps bench-pure conformance soak soak-memory clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: setup
	$(BIN)/python scripts/devstack.py

# A local Redis Cluster (3 primaries, 3 replicas), the stub and two proxies, until Ctrl-C.
run-cluster: setup
	$(BIN)/python scripts/clusterstack.py

# System packages (redis-server, chromium, promtool) are installed when missing.
test: setup
	scripts/system-deps.sh
	PATH="$(CURDIR)/.cache/prometheus/usr/bin:$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)
	@echo "== again on the embedded Valkey 9: core, invalidation, faults, cluster, sentinel"
	JSONCACHE_REDIS_SERVER=valkey $(BIN)/python -m pytest $(PYTEST_ARGS) $(VALKEY_TESTS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench.run

bench-purge: setup
	$(BIN)/python -m bench.purge

bench-parsers: setup
	$(BIN)/python -m bench.parsers

bench-codecs: setup
	$(BIN)/python -m bench.codecs

bench-client: setup
	$(BIN)/python -m bench.client

# Instructions per request under callgrind: repeatable where latency is not (needs valgrind).
bench-instructions: setup
	$(BIN)/python -m bench.instructions

# Instructions per fast hit, the protocol-level path alone, in process (valgrind).
bench-fastloop: setup
	$(BIN)/python -m bench.fastloop

# The miss overhead after idle gaps of 0-20 ms: the code's own cost against the machine's.
bench-gaps: setup
	$(BIN)/python -m bench.gaps

bench-bytes: setup
	$(BIN)/python -m bench.bytes

# Where a sequential miss's time goes, step by step (timestamps around the proxy's steps).
bench-steps: setup
	$(BIN)/python -m bench.steps

# The pure steps of a fill (plan, verdict, body, fields) in a loop, warm.
bench-pure: setup
	$(BIN)/python -m bench.pure

# Minutes of users reading and writing through two proxies while Redis fails (bounded).
soak: setup
	scripts/system-deps.sh
	$(BIN)/python -m bench.soak

# The same under memory pressure: a small maxmemory with allkeys-lru, Redis evicting all along.
soak-memory: setup
	scripts/system-deps.sh
	SOAK_MAXMEMORY=$${SOAK_MAXMEMORY:-2mb} $(BIN)/python -m bench.soak

# The http-cache-tests suite (cache-tests.fyi), installed from npm into .cache/; needs node.
conformance: setup
	$(BIN)/python scripts/conformance.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
