# The two commands of the README: `make demo` and `make test`. Each creates .venv when needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

SYSTEM_PACKAGES := chromium chromium-driver postgresql

.PHONY: demo test lint install system-packages

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/xmm-pipeline demo

system-packages:
	@./.ci/system-packages $(SYSTEM_PACKAGES)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) system-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
