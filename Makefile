# The two commands that matter on a fresh machine:
#   make demo   runs the main job offline on the bundled default
#   make test   runs the test suite
# Each creates .venv and installs what is missing (pip, so the local CPU torch wheel is used).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmms-sgl-installed
# configs/demo.yaml expects the bundled checkpoints here
MODELS_DIR := .cache/models

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

$(MODELS_DIR)/internvl-large/model.safetensors: $(STAMP) lmms_sgl/factory.py
	$(BIN)/lmms-sgl-build-models --out $(MODELS_DIR)

demo: $(STAMP) $(MODELS_DIR)/internvl-large/model.safetensors
	$(BIN)/lmms-eval --config configs/demo.yaml --wandb_args project=lmms-sgl-demo,mode=offline,dir=.cache/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache
