# Two commands for a new user (see README):
#   make quickstart   set up, then MNIST from nothing to "Draw a six" and its evaluation
#   make test         set up, then the test suite
# For a machine without internet (see README, "Offline install"):
#   make wheelhouse   wheels of every dependency except torch/torchvision/CUDA, and of the project
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# the cluster's Python and newest manylinux glibc; older manylinux tags down to 2_5 are accepted too
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORM ?= manylinux_2_28_x86_64
WHEELHOUSE ?= wheelhouse

.PHONY: setup quickstart test wheelhouse

# an older Python would make the venv, then fail at torch as 'no matching distribution' (or 'ResolutionImpossible')
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1 || { echo "make setup: the project \
	needs Python 3.10 or newer, and PYTHON=$(PYTHON) is $$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 \
	|| echo 'not found'); pass another, e.g. make $(or $(MAKECMDGOALS),setup) PYTHON=python3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/python scripts/quickstart.py configs/mnist.yaml

test: setup
	$(BIN)/python -m pytest -q

# The dependency closure is read from .venv (the tested versions, see constraints.txt), starting from
# pyproject's dependencies and its `test` extra. torch, torchvision and torch's CUDA/triton packages are
# left out so that the cluster keeps its own CUDA torch; each other package is downloaded with --no-deps
# as a wheel for $(WHEEL_PYTHON) on $(WHEEL_PLATFORM). Anything that cannot be had is listed, and the
# target fails.
wheelhouse: setup
	$(BIN)/python scripts/wheelhouse.py "$(WHEEL_PYTHON)" "$(WHEEL_PLATFORM)" "$(WHEELHOUSE)"
