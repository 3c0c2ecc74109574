# bar_lightning: `make demo` runs the main job, `make test` the fast test suite. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install test test-full lint demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools

test: install  ## fast test suite (parity, configs, sampling, a tiny fit); a few minutes on 2 CPU cores
	$(PY) -m pytest -m "not slow" -q

test-full: install  ## every test, including the full-size BAR-B step on CPU
	$(PY) -m pytest -q

lint: install  ## ruff
	$(VENV)/bin/ruff check .

demo: install  ## the main job: BAR end to end on Fashion-MNIST offline (CPU); results in outputs/demo
	$(PY) -m bar_lightning.demo --root .

clean:  ## remove outputs of local runs
	rm -rf outputs multirun
