# Every target runs from a fresh clone: `install` creates or reuses the cached environment.
SHELL := /bin/bash
VENV = $(shell scripts/venv.sh)
PY = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/transport/src:$(CURDIR)/worker/src:$(CURDIR)/operator/src
export PATH := $(VENV)/bin:$(PATH)

.PHONY: install run test test-unit test-e2e test-cluster test-images bench lint crds cluster-up cluster-down chart-lint images

install:
	@scripts/system-deps.sh
	@scripts/browser-deps.sh
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

test-images: install
	$(PY) -m pytest tests/images

crds: install
	$(PY) -m diffdisagg.operator.crdgen && scripts/sync-crds.sh

chart-lint: install
	scripts/sync-crds.sh --check
	H=$$(scripts/cluster/build.sh | tail -1)/bin/helm; for a in "" "--set watchNamespace=x"; do \
	  $$H lint --strict charts/diffdisagg-crds && $$H lint --strict charts/diffdisagg $$a || exit 1; done
	$(VENV)/bin/hadolint images/*.Dockerfile

images:
	images/build.sh

cluster-up: install
	scripts/cluster/up.sh

cluster-down:
	scripts/cluster/down.sh
