# One command installs and tests on a fresh machine: `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install browser demo test lint format bench-ops clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall whenever the dependency list changes. The demo needs the package with ONNX export
# and ONNX Runtime only; the tests also need the dev tools and Ray.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[export]'
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,export,distributed]'
	touch $@ $(DEMO_STAMP)

# The browser test drives Debian's chromium (never a downloaded browser).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

install: $(DEV_STAMP)

browser: $(CHROMIUM)

# Generate data, train (or reuse) a tiny model, export, index, serve on localhost.
demo: $(DEMO_STAMP)
	$(BIN)/python -m demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint browser
	$(BIN)/python -m pytest -n auto --durations=15

bench-ops: install
	$(BIN)/python benchmarks/ops.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
