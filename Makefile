# Every target runs from a fresh clone: `install` creates or reuses the cached environment.
SHELL := /bin/bash
VENV = $(shell scripts/venv.sh)
PY = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/transport/src:$(CURDIR)/worker/src:$(CURDIR)/operator/src
export PATH := $(VENV)/bin:$(PATH)

.PHONY: install run test test-unit test-e2e test-cluster bench lint cluster-up cluster-down chart-lint images

install:
	@scripts/system-deps.sh
	@scripts/venv.sh >/dev/null

run: install
	$(PY) -m diffdisagg.worker.launcher $(ARGS)

test: install
	@scripts/test.sh

test-unit: install
	$(PY) -m pytest tests/transport tests/worker tests/operator tests/contract tests/test_layout.py

test-e2e: install
	$(PY) -m pytest tests/e2e

test-cluster: install
	$(PY) -m pytest tests/cluster

bench: install
	$(PY) bench/run.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

cluster-up: install
	scripts/cluster/up.sh

cluster-down:
	scripts/cluster/down.sh
