"""Shared fixtures: offline environment, deterministic threads, small checkpoints built once."""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

import lmms_sgl  # noqa: E402,F401  (torchvision fix before anything imports transformers)
from lmms_sgl.factory import build as factory  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """All factory checkpoints, built once per test session (a few seconds)."""
    out = tmp_path_factory.mktemp("models")
    factory.build_all(out)
    return out


@pytest.fixture(scope="session")
def tasks_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "tasks"
