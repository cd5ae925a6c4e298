# Everyday verbs. `make test` installs everything into .venv and runs every check; `make demo` runs the
# main job. Both find PostgreSQL and Redis by themselves (see a2bd/devservers.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint typecheck unit integration demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

lint: install
	$(PY) -m ruff check a2bd agi_scripts tests bench docs

typecheck: install
	$(PY) -m mypy

test: lint typecheck
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

demo: install
	$(PY) -m a2bd.demo

bench: install
	$(PY) bench/tariff_lookup.py
	$(PY) bench/agi_authorize.py
	$(PY) bench/rating.py
	$(PY) bench/guard.py
	$(PY) bench/invoicing.py
	$(PY) bench/pdf_render.py
	$(PY) bench/storm.py

clean:
	rm -rf $(VENV) .a2bd-dev .pytest_cache .mypy_cache .ruff_cache .hypothesis
