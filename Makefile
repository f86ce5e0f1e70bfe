# cxr-ai: two commands do everything on a fresh Debian machine.
#   make demo   install what is needed, then run the demo on embedded defaults
#   make test   install what is needed, then run the whole test suite
# Both are idempotent: a second run installs nothing new.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the lean CPU wheel. GPU sites: install your CUDA build of torch into
# $(VENV) first (or set TORCH_SPEC); setup keeps any torch that already imports.
TORCH_SPEC ?= torch==2.13.0
DEBIAN_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools chromium chromium-driver
# Node.js and npm come from Debian only where the machine has none (images often ship their
# own Node, whose bundled npm conflicts with Debian's npm package).
NODE_PACKAGES := nodejs npm
PYTEST_ARGS ?=

.PHONY: setup system-deps python-deps node-deps demo test bench demo-bundle clean

setup: system-deps python-deps node-deps

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	command -v node >/dev/null && command -v npm >/dev/null || missing="$$missing $(NODE_PACKAGES)"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

python-deps: $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@$(PY) -c "import cxr_ai, pytest, data_store" 2>/dev/null && \
	  $(PIP) install -q --no-deps -e . >/dev/null 2>&1 && $(PIP) check >/dev/null 2>&1 || \
	  $(PIP) install -q -e ".[dev]"

node-deps:
	@if [ -f tests/fhir_server/package-lock.json ] && [ ! -d tests/fhir_server/node_modules ]; then \
	  cd tests/fhir_server && npm ci --no-audit --no-fund --loglevel=error; fi

demo: setup
	$(VENV)/bin/cxr-ai demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo-bundle: setup
	$(PY) -m training.demo

clean:
	rm -rf $(VENV) .pytest_cache var out
