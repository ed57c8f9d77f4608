# The two commands that matter on a fresh machine:
#   make demo   runs the main job offline on the bundled default
#   make test   runs the test suite
# Each creates .venv and installs what is missing (pip, so the local CPU torch wheel is used).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmms-sgl-installed
MODELS_DIR ?= .cache/models
OUT_DIR ?= .cache/demo

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
	$(BIN)/lmms-eval --model sgl_internvl2 \
	  --model_args pretrained=$(MODELS_DIR)/internvl-large,guide=$(MODELS_DIR)/internvl-guide,prune_layer=0.5,keep_ratio=0.2,exit_threshold=0.0016,max_tiles=6 \
	  --tasks sgl_smoke,sgl_smoke_mc --include_path tasks --batch_size 4 \
	  --output_path $(OUT_DIR) --log_samples --verbosity INFO \
	  --wandb_args project=lmms-sgl-demo,mode=offline,dir=$(OUT_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache
