# corrosion-edge: every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo
DATA ?= ../shared/data

.PHONY: run test lint bench bench-classify bench-resolution demo schemas system-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,test,dev]'
	touch $(STAMP)

$(DEMO)/model/manifest.json: | $(STAMP)
	$(VENV)/bin/corrosion-export demo --out $(DEMO)

demo: $(DEMO)/model/manifest.json

## The main job: the agent on the bundled demo (model and frames made on first run).
run: $(STAMP) demo
	$(VENV)/bin/corrosion-agent batch $(DEMO)/frames --model $(DEMO)/model --out $(DEMO)/out

# Mosquitto is what the MQTT tests start; install it when missing and we may.
system-deps:
	@if ! command -v mosquitto >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null; \
	  else echo "mosquitto missing: install it (apt-get install mosquitto)" >&2; exit 1; fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check agent export tests bench
	$(VENV)/bin/ruff format --check agent export tests bench
	$(VENV)/bin/mypy

schemas: $(STAMP)
	$(VENV)/bin/corrosion-agent schemas --out docs/schemas

bench: bench-classify bench-resolution

## Pixel engine against xgboost and onnxruntime on the same frames (reads $(DATA) for the AWS model).
bench-classify: $(STAMP)
	$(PY) bench/classify.py --data $(DATA)

clean:
	rm -rf $(DEMO) build .pytest_cache .mypy_cache .ruff_cache

## Corrosion % error and decode time of reduced-size JPEG decoding on the real photos.
bench-resolution: $(STAMP)
	PYTHONPATH=bench $(PY) bench/resolution.py --data $(DATA)
