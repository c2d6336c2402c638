# corrosion-edge: every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo
DATA ?= ../shared/data

PHONY_EXTRA := run-batch config lock bench-daemon bench-updates bench-folder bench-seen bench-soak docker-test
.PHONY: $(PHONY_EXTRA) run test lint bench bench-classify bench-resolution demo schemas system-deps clean
.PHONY: model evaluate bench-features

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[export,test,dev]'
	touch $(STAMP)

## constraints.txt, the tested set: the newest versions pyproject.toml allows, resolved in a
## throwaway venv and pinned. Then `make test` and the benchmarks before committing it.
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp" && \
	"$$tmp/bin/pip" install --quiet --upgrade pip && \
	"$$tmp/bin/pip" install --quiet '.[export,test,dev]' && \
	{ sed -n '/^#/p' constraints.txt; "$$tmp/bin/pip" freeze --exclude corrosion-edge; } > constraints.txt.new && \
	mv constraints.txt.new constraints.txt

$(DEMO)/model/manifest.json: | $(STAMP)
	$(VENV)/bin/corrosion-export demo --out $(DEMO)

demo: $(DEMO)/model/manifest.json

## The main job: the daemon on the bundled demo frames, publishing to Mosquitto on
## 127.0.0.1:1883 when one runs (else the detections wait in its outbox); exits when done.
run: $(STAMP) demo
	$(VENV)/bin/corrosion-agent run --config config/demo.toml --exit-when-done

## The batch CLI on the same frames: results.csv and overlays in demo/out.
run-batch: $(STAMP) demo
	$(VENV)/bin/corrosion-agent batch $(DEMO)/frames --model $(DEMO)/model --out $(DEMO)/out

## config/agent.toml is generated from agent/config/ (a test keeps them in step).
config: $(STAMP)
	$(PY) -c "from agent.config import commented_defaults as d; print(d(), end='')" > config/agent.toml

# The tests start Mosquitto and run systemd-analyze on the unit: install them when
# missing and we may (Debian packages mosquitto and systemd).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing (apt-get install$$missing)" >&2; exit 1; fi; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

## The image built from the Dockerfile and run as docs/DEPLOY.md runs it (hardened flags,
## a named volume, a real broker): needs a Docker engine, so `make test` leaves it out.
docker-test: $(STAMP) system-deps
	@docker info >/dev/null 2>&1 || { echo "docker-test: no Docker engine answers 'docker info'" >&2; exit 1; }
	$(PY) -m pytest -q -m docker tests/test_docker.py

lint: $(STAMP)
	$(VENV)/bin/ruff check agent export tests bench
	$(VENV)/bin/ruff format --check agent export tests bench
	$(VENV)/bin/mypy

schemas: $(STAMP)
	$(VENV)/bin/corrosion-agent schemas --out docs/schemas

bench: bench-classify bench-resolution bench-daemon bench-updates bench-folder bench-seen

## Pixel engine against xgboost and onnxruntime on the same frames (reads $(DATA) for the AWS model).
bench-classify: $(STAMP)
	$(PY) bench/classify.py --data $(DATA)

clean:
	rm -rf $(DEMO) build .pytest_cache .mypy_cache .ruff_cache

## The daemon end to end: 300 1080p JPEGs, watched folder -> PUBACK from a local Mosquitto.
bench-daemon: $(STAMP) system-deps demo
	PYTHONPATH=. $(PY) bench/daemon.py --data $(DATA)

## Model swap time (promote -> first frame on the new model) and capture uploads/s, local S3.
bench-updates: $(STAMP) demo
	PYTHONPATH=. $(PY) bench/updates.py --data $(DATA)

## CPU per rescan of a watched folder full of analysed photos: ours against the os.walk scan.
bench-folder: $(STAMP)
	PYTHONPATH=. $(PY) bench/folder.py

## A day at 15 frames/s through a watched folder: the seen-files record's start, memory and
## hourly check, against the same steps before they were bounded.
bench-seen: $(STAMP)
	PYTHONPATH=. $(PY) bench/seen_record.py

## Ten minutes of the daemon as a process on a live folder (15 1080p JPEGs/s, MQTT, S3 uploads):
## RSS, fds, threads and state files sampled every 10 s; growth per hour after a warm-up.
bench-soak: $(STAMP) system-deps demo
	PYTHONPATH=. $(PY) bench/soak.py --data $(DATA)

## Corrosion % error and decode time of reduced-size JPEG decoding on the real photos.
bench-resolution: $(STAMP)
	PYTHONPATH=bench $(PY) bench/resolution.py --data $(DATA)

## The recommended model (texture features, export/recipe.py) from $(DATA) into build/model.
model: $(STAMP)
	$(VENV)/bin/corrosion-export recipe texture --data $(DATA) --out build/model

## Accuracy on $(DATA), cross-validated where there is no test set; writes bench/ACCURACY.md.
EVAL := build/evaluate
CE := $(VENV)/bin/corrosion-export
evaluate: model
	rm -rf $(EVAL) && mkdir -p $(EVAL)/results
	$(CE) recipe aws-rgb --data $(DATA) --out $(EVAL)/aws-rgb
	$(CE) recipe aws-rgb --payload --data $(DATA) --out $(EVAL)/aws-payload
	$(CE) evaluate pixels --model $(EVAL)/aws-rgb --csv $(DATA)/aws-rust-detection/validation.csv \
	  --json --report $(EVAL)/report > $(EVAL)/results/pixels-aws-rgb.json
	$(CE) evaluate pixels --model $(EVAL)/aws-payload \
	  --csv $(DATA)/aws-rust-detection/validation.csv --json > $(EVAL)/results/pixels-aws-payload.json
	$(CE) evaluate cv-images --data $(DATA) --repeats 5 --json --report $(EVAL)/report > $(EVAL)/results/cv-images.json
	$(CE) evaluate cv-boxes --data $(DATA) --json --report $(EVAL)/report > $(EVAL)/results/cv-boxes.json
	$(CE) evaluate cv-images --data $(DATA) --repeats 5 --no-image-rule --json \
	  > $(EVAL)/results/cv-images-no-rule.json
	$(CE) evaluate cv-images --data $(DATA) --repeats 5 --outside-pixels 250 --json \
	  > $(EVAL)/results/cv-images-outside-250.json
	$(CE) evaluate cv-images --data $(DATA) --repeats 5 --no-scene --json \
	  > $(EVAL)/results/cv-images-no-scene.json
	$(CE) evaluate cv-images --data $(DATA) --repeats 5 --rule-threshold lowest --json \
	  > $(EVAL)/results/cv-images-lowest.json
	$(CE) evaluate cv-boxes --data $(DATA) --outside-pixels 250 --json \
	  > $(EVAL)/results/cv-boxes-outside-250.json
	$(CE) evaluate cv-boxes --data $(DATA) --no-box-scorer --json \
	  > $(EVAL)/results/cv-boxes-no-box-scorer.json
	$(CE) evaluate images --model build/model --rust $(DATA)/corrosion-detector/rustnorust/validation/rust \
	  --norust $(DATA)/corrosion-detector/rustnorust/validation/norust --json \
	  > $(EVAL)/results/images-validation.json
	$(CE) evaluate summary --results $(EVAL)/results --report $(EVAL)/report --out bench/ACCURACY.md

## Feature model ms per 640x360 frame on one core: served (stride) vs brute force.
bench-features: $(STAMP)
	OMP_NUM_THREADS=1 PYTHONPATH=. $(PY) bench/features.py --data $(DATA) --model build/model
