"""Absolute location of this task's shipped data, for ``dataset_path: !function paths.DATA_DIR``."""

from pathlib import Path

DATA_DIR = str(Path(__file__).resolve().parent / "data")
