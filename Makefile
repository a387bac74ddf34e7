# Two commands for a new user (see README):
#   make quickstart   set up, then MNIST from nothing to "Draw a six" and its evaluation
#   make test         set up, then the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/quickstart.sh configs/mnist.yaml

test: setup
	$(BIN)/python -m pytest -q
