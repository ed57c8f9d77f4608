"""The ``sgl_shapes`` test data, shared (``dataset_path: !function paths.DATA_DIR``)."""

from pathlib import Path

DATA_DIR = str(Path(__file__).resolve().parent.parent / "sgl_shapes" / "data")
