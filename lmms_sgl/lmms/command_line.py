"""The lmms-eval command line the SGL models run under, read where a check must happen before the
weights load (W&B, ``--output_path``, ``--tasks``): lmms-eval passes none of these to a model."""

from __future__ import annotations


def flag_position(argv: list[str], flag: str) -> tuple[int, str] | None:
    """Where ``flag``'s value sits in ``argv`` and the value (``--flag v`` or ``--flag=v``)."""
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return index + 1, argv[index + 1]
        if arg.startswith(f"{flag}="):
            return index, arg.split("=", 1)[1]
    return None


def flag_value(argv: list[str], flag: str) -> str | None:
    """``flag``'s value in ``argv``, or ``None``."""
    found = flag_position(argv, flag)
    return None if found is None else found[1]
