"""This task reuses the shipped data of ``sgl_shapes`` (same questions, another metric)."""

from pathlib import Path

DATA_DIR = str(Path(__file__).resolve().parent.parent / "sgl_shapes" / "data")
