# One entry point for people and CI. `make test` and `make up` set up everything they need first.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test up demo lint kafka-jars clean

# The venv is rebuilt only when the dependency list changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required (found none as $(PYTHON))"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip check
	@touch $(STAMP)

install: $(STAMP)

kafka-jars: $(STAMP)
	$(BIN)/python -c "from cohere_gateway import localkafka as k; k.java_major_version(); k.ensure_jars(print)"

test: install kafka-jars
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
