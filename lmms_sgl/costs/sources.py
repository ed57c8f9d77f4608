"""Find a checkpoint's ``config.json`` (bundled name, local folder or hub cache) and build its config.

Only ``config.json`` is read, never weights, and the hub is never contacted: the cost command must
work offline for checkpoints that are too large to download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The real pairs' config.json files: inside the package in a built wheel (pyproject force-includes
# configs/checkpoints there), in the source tree for the editable install the README uses.
_PACKAGED = Path(__file__).resolve().parent / "bundled_configs"
BUNDLED = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "configs" / "checkpoints"
FAMILIES = {
    "internvl": "internvl",
    "internvl_chat": "internvl",
    "llava": "llava",
    "llava_next": "llava",
    "llava_onevision": "llava",
    "qwen2_vl": "qwen_vl",
    "qwen2_5_vl": "qwen_vl",
    "qwen3_vl": "qwen_vl",
}


class SourceError(ValueError):
    """A checkpoint argument whose config cannot be used; the message names the argument."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's family and its transformers-native config (original InternVL translated)."""

    source: str
    family: str  # "internvl", "llava" or "qwen_vl"
    config: object

    @property
    def name(self) -> str:
        return Path(self.source.rstrip("/")).name


def bundled_names() -> list[str]:
    return sorted(p.parent.name for p in BUNDLED.glob("*/config.json"))


def config_folder(source: str, argument: str) -> Path:
    """The folder holding ``config.json``: a bundled name, a local folder, or a hub id in the cache."""
    if (BUNDLED / source / "config.json").is_file():
        return BUNDLED / source
    local = Path(source)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise SourceError(f"{argument}={source!r}: the folder has no config.json")
        return local
    if source.count("/") == 1 and not local.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent
    raise SourceError(
        f"{argument}={source!r} is not a bundled config, a local folder or a hub id in the local "
        f"huggingface cache; allowed bundled names: {', '.join(bundled_names())}"
    )


def read_checkpoint(source: str, argument: str) -> Checkpoint:
    """Read and translate one checkpoint's config (an unsupported family is refused by name)."""
    folder = config_folder(source, argument)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{argument}={source!r}: unreadable config.json ({error})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in FAMILIES:
        raise SourceError(
            f"{argument}={source!r} is a {model_type!r} checkpoint; allowed model types: {sorted(FAMILIES)}"
        )
    if model_type == "internvl_chat":
        from lmms_sgl.checkpoints.internvl_original.config import (
            OriginalCheckpointError,
            read_original_config,
        )

        try:
            original = read_original_config(folder, argument)
        except OriginalCheckpointError as error:
            raise SourceError(str(error)) from None
        return Checkpoint(source, "internvl", original.transformers_config(image_token_id=0))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise SourceError(
            f"{argument}={source!r}: config.json does not load in transformers ({error})"
        ) from None
    return Checkpoint(source, FAMILIES[model_type], config)
