"""Refuse an unwritable ``--output_path`` before the weights load.

lmms-eval writes its results only after the whole evaluation; with an output path it cannot write
it logs the error and exits 0, so hours of work end with nothing saved. The SGL models read the
command line they run under and probe the path first (a real write, which also catches read-only
file systems where a permission check would not).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lmms_sgl.lmms.command_line import flag_value


def check_output_path(argv: list[str] | None = None) -> None:
    """Raise when the ``--output_path`` of ``argv`` (default ``sys.argv``) cannot be written."""
    value = flag_value(sys.argv if argv is None else argv, "--output_path")
    if not value:
        return
    path = Path(value).expanduser()
    folder = path if path.suffix == "" or path.is_dir() else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lmms-sgl-write-probe-"):
            pass
    except OSError as error:
        raise ValueError(
            f"--output_path={value!r} cannot be written ({type(error).__name__}: {error}); lmms-eval would "
            "run the whole evaluation and then fail to save its results. Give a writable folder"
        ) from error
