# One entry point for people and CI. `make test` and `make up` set up everything they need first.
# The newest Python >= 3.12 on PATH or in pyenv (infra/find-python says what to install if none).
PYTHON ?= $(shell infra/find-python)
VENV   ?= .venv
# A second Python >= 3.12 of another minor version, if the machine has one: `make test` also runs the
# fast unit subset on it, so both supported versions are exercised.
PYTHON_ALT ?= $(shell infra/find-python --other $(PYTHON))
VENV_ALT   ?= .venv-alt
UNIT_TESTS := tests/test_routing.py tests/test_usage.py tests/test_events.py tests/test_spool.py \
              tests/test_emulator_units.py tests/test_consumer_batching.py tests/test_mitmproxy_seam.py \
              tests/test_pricing.py tests/test_retries_units.py tests/test_gateway_config.py \
              tests/test_ratelimits_units.py
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test unit-alt up demo lint kafka-jars system-deps test-deps clean

# The venv is rebuilt only when the dependency list changes.
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { infra/find-python >/dev/null; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip check
	@touch $(STAMP)

install: $(STAMP)

kafka-jars: $(STAMP)
	$(BIN)/python -c "from cohere_gateway import localkafka as k; k.java_major_version(); k.ensure_jars(print)"

system-deps:
	@infra/system-deps

test-deps:
	@infra/system-deps test

test: test-deps install kafka-jars
	$(BIN)/pytest
	@$(MAKE) --no-print-directory unit-alt

unit-alt:
	@if [ -z "$(PYTHON_ALT)" ]; then echo "No second Python >= 3.12 found: unit subset on it skipped."; else \
	  echo "Unit subset on $$($(PYTHON_ALT) --version):"; \
	  test -x $(VENV_ALT)/bin/python || $(PYTHON_ALT) -m venv $(VENV_ALT); \
	  $(VENV_ALT)/bin/pip install --quiet --upgrade pip && $(VENV_ALT)/bin/pip install --quiet -e '.[test]' && \
	  $(VENV_ALT)/bin/pip check && $(VENV_ALT)/bin/pytest -q $(UNIT_TESTS); fi

# The main job: the whole pipeline on this machine. `make demo` also runs the Cohere emulator as upstream
# and drives SDK traffic through the gateway, so the dashboard fills without a Cohere key (the venv's
# `.[dev]` install includes the `demo` extra they need, through `test`).
up: system-deps install
	$(BIN)/cohere-gateway up $(ARGS)

demo: system-deps install
	$(BIN)/cohere-gateway up --demo $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VENV_ALT) infra/kafka/lib .cohere-gateway .pytest_cache
