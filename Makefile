# One entry point for people and CI. `make test` and `make up` set up everything they need first.
# The newest Python >= 3.12 on PATH or in pyenv (infra/find-python says what to install if none).
PYTHON ?= $(shell infra/find-python)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test up demo lint kafka-jars system-deps clean

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

test: system-deps install kafka-jars
	$(BIN)/pytest

# The main job: the whole pipeline on this machine. `make demo` also runs the Cohere emulator as upstream
# and drives SDK traffic through the gateway, so the dashboard fills without a Cohere key.
up: install
	$(BIN)/cohere-gateway up $(ARGS)

demo: install
	$(BIN)/cohere-gateway up --demo $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) infra/kafka/lib .cohere-gateway .pytest_cache
