"""Absolute location of the shared smoke data (this task reuses ``sgl_smoke``'s parquet)."""

from pathlib import Path

DATA_DIR = str(Path(__file__).resolve().parent.parent / "sgl_smoke" / "data")
