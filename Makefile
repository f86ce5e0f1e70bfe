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
# Extra pip options for torch alone, e.g. PyTorch's CPU-only wheel index on a machine whose pip
# would otherwise take the CUDA build.
TORCH_PIP_ARGS ?=
# Every other Python package is installed at the version that CI tested: requirements.lock,
# written by pip-tools (`make lock`). torch is kept out of it (see TORCH_SPEC).
LOCK := requirements.lock
LOCK_VENV ?= .venv-lock
PIP_TOOLS_SPEC ?= pip-tools==7.6.2
LOCK_ARGS ?=
DEBIAN_PACKAGES := orthanc orthanc-dicomweb dcmtk dicom3tools chromium chromium-driver prometheus logrotate
# Node.js and npm come from Debian only where the machine has none (images often ship their
# own Node, whose bundled npm conflicts with Debian's npm package).
NODE_PACKAGES := nodejs npm
PYTEST_ARGS ?=

.PHONY: setup system-deps python-deps node-deps demo test bench demo-bundle conformance-statement lock clean

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

python-deps: $(VENV)/.locked

# Installs torch (unless one imports already), then the project with every other package at
# its locked version, and checks the result; redone whenever the lock or pyproject.toml change.
$(VENV)/.locked: $(LOCK) pyproject.toml | $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -c $(LOCK) -e ".[dev]"
	@$(PIP) check
	@$(PY) deploy/check_lock.py --lock $(LOCK)
	@touch $@

# Refresh requirements.lock after pyproject.toml changed: keeps every pin that still fits and
# resolves what is new. `make lock LOCK_ARGS=--upgrade` moves everything to the newest releases
# (then run `make test` before committing the lock). torch is resolved as TORCH_SPEC (the CPU
# wheel) for its dependencies' sake but not written; a lock that pulled CUDA packages is refused.
lock: $(LOCK_VENV)/bin/pip-compile
	@echo "$(TORCH_SPEC)" > $(LOCK_VENV)/torch-constraint.txt
	@cp $(LOCK) $(LOCK_VENV)/$(LOCK) 2>/dev/null || rm -f $(LOCK_VENV)/$(LOCK)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --all-extras \
	  --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
	  --unsafe-package torch --constraint $(LOCK_VENV)/torch-constraint.txt \
	  $(LOCK_ARGS) --output-file $(LOCK_VENV)/$(LOCK) pyproject.toml
	@if grep -E -q '^(nvidia-|triton==|cuda-)' $(LOCK_VENV)/$(LOCK); then \
	  echo "make lock: pip resolved a CUDA build of $(TORCH_SPEC) (nvidia-*/triton pinned); $(LOCK) is" \
	       "unchanged. Make the CPU wheel visible to pip (LOCK_ARGS=\"--find-links DIR\" or PyTorch's CPU" \
	       "index with --extra-index-url) and rerun make lock." >&2; \
	  exit 1; fi
	@cp $(LOCK_VENV)/$(LOCK) $(LOCK)
	@echo "$(LOCK) written; run make test, then commit it with pyproject.toml"

$(LOCK_VENV)/bin/pip-compile:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(PIP_TOOLS_SPEC)"

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

# The DICOM Conformance Statement, generated from the code's own tables (a test checks the
# committed file matches).
conformance-statement: setup
	$(VENV)/bin/cxr-ai conformance --out docs/dicom-conformance-statement.md

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache var out
