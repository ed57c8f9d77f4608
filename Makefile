# The two commands that matter on a fresh machine:
#   make demo   runs the main job offline on the bundled default (the trained InternVL pair in models/)
#   make test   runs the test suite
# Each creates .venv and installs what is missing (pip, so the local CPU torch wheel is used).
# Also: make study (regenerates reports/proving_ground.md), make proving-models (retrains models/).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmms-sgl-installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install demo test lint study proving-models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lmms-eval --config configs/demo.yaml --wandb_args project=lmms-sgl-demo,mode=offline,dir=.cache/demo

# reports/proving_ground.md: the method comparison, then its multi-tile resolution and unit-selection
# sections; reports/spread.md: guided spread selection (radius chosen on validation). Finished
# points are cached in .cache/study (keyed by the checkpoints' hash), so an interrupted study resumes.
study: $(STAMP)
	$(BIN)/lmms-sgl-proving-study
	$(BIN)/python -m lmms_sgl.proving.resolution
	$(BIN)/python -m lmms_sgl.proving.unit_selection
	$(BIN)/python -m lmms_sgl.proving.spread

# Retrains and re-exports the four shipped checkpoints (about 4 h on 2 cores, two lanes in
# parallel); resumable: run it again after an interruption.
proving-models: $(STAMP)
	$(BIN)/lmms-sgl-train-proving --models shapes-internvl-large --threads 1 --export models & lane=$$!; \
	$(BIN)/lmms-sgl-train-proving --models shapes-llava-large shapes-internvl-guide shapes-llava-guide \
		--threads 1 --export models; status=$$?; wait $$lane && exit $$status

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache
