# Shopsight: `make demo` runs the pipeline on this machine, `make test` runs the test suite.
# Both set up what they need from scratch: a Python 3.11 virtualenv in .venv with the pinned, hash-checked
# packages (requirements/lock.txt; requirements/compile.sh regenerates it), and Java 17+ for Spark.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench chaos lint setup java services clean help

help:
	@echo "make demo   - set up and run the whole pipeline on the embedded default (local Spark, Ray, Feast, MLflow)"
	@echo "make test   - set up and run the test suite (all tiers but gpu)"
	@echo "make bench  - run the benchmarks and record results under benchmarks/results/"
	@echo "make chaos  - run the chaos suite (also part of make test) and record its counts in benchmarks/results/chaos.md"
	@echo "make lint   - ruff"

setup: $(STAMP) java

$(STAMP): pyproject.toml requirements/lock-build.txt requirements/lock.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Shopsight needs Python 3.11, found " + sys.version.split()[0]' \
		|| { echo "error: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# Hash-checked: pip and the build tools first (lock-build.txt), then every package of the lock, then the
	# project, which pip cannot hash-check, without its dependencies. --no-build-isolation: what is built (the
	# project, pyspark's sdist) is built by the locked setuptools, not by one pip would fetch unhashed.
	# torch is 2.13.0+cpu: pip finds it through PIP_FIND_LINKS (this kind of machine, CI) or PyTorch's CPU
	# index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make test).
	$(BIN)/python -m pip install --quiet --require-hashes --requirement requirements/lock-build.txt
	$(BIN)/python -m pip install --quiet --require-hashes --no-build-isolation --requirement requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	@touch $(STAMP)

# Spark 4 needs Java 17+. As root on Debian we install it; elsewhere we say how.
java:
	@v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1); \
	if [ -z "$$v" ] || [ "$$v" -lt 17 ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "Java 17+ not found (found: $${v:-none}); installing openjdk-17-jre-headless"; \
			apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; \
		else \
			echo "error: Spark needs Java 17 or newer (found: $${v:-none}); install it (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME" >&2; \
			exit 1; \
		fi; \
	fi

# Servers the tests start themselves on loopback: Redis (the online store), PostgreSQL (MLflow's and
# Feast's SQL backends; the tests create a throwaway cluster with its initdb) and Prometheus (it scrapes the
# serving metrics); and Chromium, the headless browser that looks at the pages (Feast's UI, the monitor's
# report).
services:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "PostgreSQL not found; installing it"; \
			apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; \
			service postgresql stop >/dev/null 2>&1 || true; \
		else \
			echo "warning: PostgreSQL not found; its tests will skip (install postgresql)" >&2; \
		fi; }
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "redis-server not found; installing it"; \
			apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
			service redis-server stop >/dev/null 2>&1 || true; \
		else \
			echo "warning: redis-server not found; Redis tests will skip (install redis-server)" >&2; \
		fi; }
	@command -v prometheus >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "Prometheus not found; installing it (a test scrapes the serving metrics with it)"; \
			apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; \
			service prometheus stop >/dev/null 2>&1 || true; \
		else \
			echo "warning: Prometheus not found; its scrape test will skip (install prometheus)" >&2; \
		fi; }
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "Chromium not found; installing it (the pages' tests look at them in a headless browser)"; \
			apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "warning: Chromium not found; the browser tests will skip (install chromium)" >&2; \
		fi; }

demo: setup
	$(BIN)/shopsight demo

test: setup services
	$(BIN)/lint-imports
	$(BIN)/deptry .
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

chaos: setup services
	$(BIN)/python -m benchmarks.chaos_report

# The benchmarks compare against the ctgan package: the `bench` extra.
bench: setup services
	$(BIN)/python -m pip install --quiet --require-hashes --no-build-isolation --requirement requirements/lock-bench.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	$(BIN)/python -m benchmarks.bench_simulator
	$(BIN)/python -m benchmarks.bench_features
	$(BIN)/python -m benchmarks.bench_user_snapshots --task purchase
	$(BIN)/python -m benchmarks.bench_user_snapshots --task churn --users 20000 --days 20 --burn-in 7
	$(BIN)/python -m benchmarks.bench_gan
	$(BIN)/python -m benchmarks.bench_training
	$(BIN)/python -m benchmarks.bench_serving
	$(BIN)/python -m benchmarks.bench_cluster
	$(BIN)/python -m benchmarks.bench_long_history --out .shopsight/next_item-long.json --record

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .shopsight .pytest_cache
