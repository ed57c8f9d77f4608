"""Sections of a Markdown report that a command owns, between two marker comments, so that the
command can rewrite its own section on a rerun and leave the rest of the report alone."""

from __future__ import annotations

from pathlib import Path


def insert_marked_section(path: Path, lines: list[str], start: str, end: str) -> Path:
    """Replace the block between ``start`` and ``end`` in ``path`` by ``lines`` (which include both
    markers), or append it when the file has no such block yet."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return path
