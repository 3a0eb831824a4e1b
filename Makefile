# make demo: set-up, then the whole pipeline on the built-in default. make test: set-up, then the test suite.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_DATA_PARQUET_FOOTER_NUM_ACTORS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch/torchvision are pinned as a pair (other pairs break open_clip and transformers); constraints.txt pins the rest.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.14.1 torchvision==0.29.1 -e '.[cpu,test]' 2>&1 | sed '/is ignored: it is neither/d'
	$(BIN)/python -c "import torch, torchvision, ray, ray.serve, fastapi, transformers, peft, deepspeed, faiss, open_clip, pyarrow, omegaconf"
	touch $(STAMP)

demo: setup
	$(BIN)/python jobs/demo.py

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# every bench's quick mode, one after another; writes bench/RESULTS.md and the README's bench table
bench: setup
	$(BIN)/python bench/run_all.py --readme

clean:
	rm -rf $(VENV) .cache outputs
