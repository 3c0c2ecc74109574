# bar_lightning: `make demo` runs the main job, `make test` the fast test suite. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install test test-full test-app lint demo app clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its dev tools

test: install  ## the layer contract, then the fast test suite (parity, configs, sampling, a tiny fit); ~10 min on 2 cores
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow" -q

test-full: install  ## every test, including the full-size BAR-B step on CPU
	$(PY) -m pytest -q

test-app: install  ## the sampler page's tests with the browser (needs: apt-get install -y chromium chromium-driver)
	$(PY) -m pytest -q tests/test_app.py tests/test_app_browser.py

lint: install  ## ruff and the layer contract (import-linter, pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

demo: install  ## the main job: BAR end to end on Fashion-MNIST offline (CPU); results in outputs/demo
	$(PY) -m bar_lightning.demo --root .

app: install  ## the sampler page on the demo's checkpoints (after make demo); prints its URL, Ctrl-C stops it
	@test -f outputs/demo/generator/checkpoints/last.ckpt || { echo "outputs/demo has no checkpoints: run make demo first"; exit 1; }
	$(PY) -m bar_lightning.app generator.checkpoint=$(CURDIR)/outputs/demo/generator/checkpoints/last.ckpt \
	    tokenizer.checkpoint=$(CURDIR)/outputs/demo/tokenizer/checkpoints/last.ckpt $(APP_ARGS)

clean:  ## remove outputs of local runs
	rm -rf outputs multirun
