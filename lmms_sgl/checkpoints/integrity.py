"""Cheap integrity checks of checkpoint files, run before any weights load.

A truncated or corrupt ``*.safetensors`` file otherwise fails deep inside ``from_pretrained`` with
``Error while deserializing header`` (no file, no argument named), and only after the other model
has spent minutes loading. Reading each file's header and comparing its declared size with the
file's size costs a few kilobytes of I/O per shard.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint lmms-sgl cannot serve; the message says what is supported."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is unreadable; the message names the argument and the file."""


def safetensors_header(path: Path) -> dict:
    """The JSON header of one ``.safetensors`` file, after checking that the file holds every byte
    its header declares (a truncated download or copy is caught here, not mid-load)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - 8:
            raise CorruptCheckpointError(
                f"{path}: header declares {header_size} bytes but the file has {size} (truncated?)"
            )
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({error})") from None
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    end = max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if 8 + header_size + end != size:
        raise CorruptCheckpointError(
            f"{path}: tensors need {8 + header_size + end} bytes but the file has {size} (truncated?)"
        )
    return header


def check_weights(folder: str | Path, argument: str) -> list[Path]:
    """Validate every safetensors file of a local checkpoint folder; return them.

    Raises :class:`CorruptCheckpointError` naming ``argument`` (e.g. ``pretrained``) and the file.
    Hub ids that are not local folders are left to ``from_pretrained`` (nothing to read yet).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            listed = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as error:
            raise CorruptCheckpointError(
                f"{argument}={str(folder)!r}: unreadable {index.name} ({error})"
            ) from None
        missing = [name for name in listed if not (folder / name).exists()]
        if missing:
            raise CorruptCheckpointError(
                f"{argument}={str(folder)!r}: shards listed in {index.name} are missing: {missing}"
            )
    for file in files:
        try:
            safetensors_header(file)
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(f"{argument}={str(folder)!r}: {error}") from None
    return files


def check_finite(model, path: str, argument: str, shown: int = 5) -> None:
    """Refuse a loaded model whose weights hold NaN or inf (a corrupt copy whose header is fine):
    without this every answer is silently empty. One pass over the weights, on their devices; a
    weight left on the ``meta`` device (offloaded) is not read."""
    import torch

    bad = [
        name
        for name, tensor in model.named_parameters()
        if tensor.device.type != "meta"
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        names = ", ".join(bad[:shown]) + (f" and {len(bad) - shown} more" if len(bad) > shown else "")
        raise CorruptCheckpointError(
            f"{argument}={path!r}: {len(bad)} weight tensor(s) hold NaN or inf ({names}); the checkpoint's "
            "data is corrupt (re-download or re-convert it)"
        )


# Any one of these is a tokenizer transformers can load (fast JSON, SentencePiece, BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")


def check_tokenizer_files(folder: str | Path, argument: str) -> None:
    """A local checkpoint folder must hold a tokenizer; without one transformers fails only after
    the weights have loaded, advising to install sentencepiece or tiktoken, and names neither the
    argument nor the files. Hub ids are left to the hub cache."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{argument}={str(folder)!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "copy them from the checkpoint's source next to config.json"
        )
