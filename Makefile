# jsoncache: a caching reverse proxy for JSON APIs.
#   make run    set up, then run Redis (reused or started), the upstream stub and the proxy
#   make test   set up, then run the tests (they start their own redis-server processes)
#   make lint   ruff and mypy          make bench   hits, misses, bytes stored vs a baseline
#   make conformance   the cache-tests.fyi suite against the proxy (needs node and npm)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup run test lint bench bench-purge bench-parsers bench-codecs conformance soak soak-memory clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: setup
	@command -v redis-server >/dev/null || [ -n "$$REDIS_CACHE_URL" ] || \
		echo "note: redis-server is not installed; make run uses \$$REDIS_CACHE_URL or redis://localhost:6379/1 if one answers"
	$(BIN)/python scripts/devstack.py

# System packages (redis-server, chromium, promtool) are installed when missing.
test: setup
	scripts/system-deps.sh
	PATH="$(CURDIR)/.cache/prometheus/usr/bin:$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

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
