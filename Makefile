# fastadapt: `make serve` and `make test` set everything up themselves.
#
#   make serve        migrate, then serve on 127.0.0.1:8000 (PORT=9000 make serve)
#   make test         the whole test suite
#   make lint         ruff check, ruff format --check, mypy (CI runs it before the tests)
#   make bench        the seven serving benchmarks of docs/benchmarks.md (~20 min; installs wrk)
#   make bench-soak   replicas on one PostgreSQL under a checked load (docs/deployment.md#capacity)
#   make docker-smoke the compose deployment end to end (docs/deployment.md; needs Docker)
#
# The virtual environment is created once and reinstalled only when pyproject.toml (or
# the client library's) changes. torch is installed first: TORCH names it (the CPU wheel
# that pip finds on this machine's disk); TORCH_PIP_ARGS adds pip options, e.g.
#   make test TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SERVE_HOST ?= 127.0.0.1
PORT ?= 8000

BIN := $(VENV)/bin
STAMP := $(VENV)/.fastadapt-installed

.PHONY: install serve migrate test lint bench bench-soak clean docker-smoke

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The client library (clients/python, its own distribution, without torch) is installed
# editable beside the service: the tests use it against real servers.
CLIENT := clients/python

$(STAMP): pyproject.toml $(CLIENT)/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e $(CLIENT)
	touch $@

migrate: $(STAMP)
	$(BIN)/fastadapt migrate

serve: migrate
	$(BIN)/fastadapt serve --host $(SERVE_HOST) --port $(PORT)

# PostgreSQL tests use the local server unless FASTADAPT_TEST_POSTGRES_URL says otherwise
# (set it empty to skip them).
test: $(STAMP)
	FASTADAPT_TEST_POSTGRES_URL="$${FASTADAPT_TEST_POSTGRES_URL-postgresql+psycopg://postgres@127.0.0.1:5432/test}" \
	  $(BIN)/python -m pytest -q --durations=15 tests

# What CI runs before the tests: lint, format and types of the shipped code and the
# benchmarks (tests are linted and formatted too).
LINTED := models service migrations benchmarks scripts $(CLIENT)/fastadapt_client
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED) tests
	$(BIN)/ruff format --check $(LINTED) tests
	$(BIN)/mypy $(LINTED)

# In-process adaptation and predictions, HTTP batching on/off and the HTTP ceiling, the
# params cache under a working set five times its size, storage per version, image
# adaptation, bulk endpoints against one request per client, the text family over HTTP
# (batching on/off): each prints a table (docs/benchmarks.md).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench: $(STAMP)
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }
	$(BIN)/python -m benchmarks.bench_adapt
	$(BIN)/python -m benchmarks.bench_http --seconds 4 --repeats 3
	$(BIN)/python -m benchmarks.bench_cache --seconds 4 --repeats 3
	FASTADAPT_TEST_POSTGRES_URL="$${FASTADAPT_TEST_POSTGRES_URL-postgresql+psycopg://postgres@127.0.0.1:5432/test}" \
	  $(BIN)/python -m benchmarks.bench_storage
	$(BIN)/python -m benchmarks.bench_images
	$(BIN)/python -m benchmarks.bench_bulk
	$(BIN)/python -m benchmarks.bench_text

# Two replicas on PostgreSQL (a fresh schema of FASTADAPT_TEST_POSTGRES_URL's database,
# dropped afterwards) under a checked adapt/predict load for 60 s, then a count in the
# database; exits 1 on any mismatch or missing version. SOAK_ARGS: e.g.
# '--capacity 1,3 --seconds 45 --turns 3' for the capacity table. Not part of `make test`.
SOAK_ARGS ?=
bench-soak: $(STAMP)
	FASTADAPT_TEST_POSTGRES_URL="$${FASTADAPT_TEST_POSTGRES_URL-postgresql+psycopg://postgres@127.0.0.1:5432/test}" \
	  $(BIN)/python -m benchmarks.bench_soak $(SOAK_ARGS)

# docker-compose.yml end to end through its load balancer: builds the images (cached), three
# replicas on PostgreSQL, keys, adapt then predict, a replica stopped under traffic, the stack
# restarted with every version kept; then tears its project down. Not part of `make test`.
# It uses the `docker` CLI's engine (DOCKER_HOST when set, e.g. from `docker-here up`) and
# `docker compose`, else `docker-compose`; SMOKE_ARGS: --keep, --port N (default 18080).
docker-smoke:
	$(PYTHON) scripts/docker_smoke.py $(SMOKE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
