"""``--model_args`` for the SGL models: coerced from lmms-eval's strings and validated up front.

lmms-eval types values heuristically (``"0.35"`` -> float, ``"true"`` -> bool, ``"none"`` stays a
string), so every argument is coerced here, and every error names the argument, the value and
what is allowed, before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lmms_sgl.method.importance import PRECISIONS
from lmms_sgl.method.settings import DRAFT_SOURCES, METHODS, SGLSettings

DTYPES = ("auto", "float32", "bfloat16", "float16")
LARGE_ATTENTION = ("sdpa", "eager")


def _none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def as_float(name: str, value, allow_none: bool = False) -> float | None:
    if allow_none and _none(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        allowed = "a number or 'none'" if allow_none else "a number"
        raise ValueError(f"{name}={value!r} must be {allowed}") from None


def as_int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> int | None:
    if allow_none and _none(value):
        return None
    try:
        number = float(value)
        if isinstance(value, bool) or number != int(number):
            raise ValueError
        number = int(number)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a whole number") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name}={number} must be >= {minimum}")
    return number


def as_choice(name: str, value, choices: tuple[str, ...]) -> str:
    text = str(value).strip()
    if text not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
    return text


@dataclass(frozen=True)
class ModelArgs:
    pretrained: str
    guide: str | None
    settings: SGLSettings
    device: str | None
    device_map: str | None
    dtype: str
    attn_implementation: str
    max_tiles: int | None
    batch_size: int
    min_pixels: int | None = None
    max_pixels: int | None = None
    guide_max_tiles: int | None = None
    guide_max_crops: int | None = None

    @property
    def guide_layout(self) -> dict:
        """The guide's own image layout (``for_guide`` of the family validates it)."""
        return {"guide_max_tiles": self.guide_max_tiles, "guide_max_crops": self.guide_max_crops}

    @property
    def settings_dict(self) -> dict:
        return {f.name: getattr(self.settings, f.name) for f in fields(self.settings)}


def parse_model_args(
    pretrained=None,
    guide=None,
    method="sgl",
    token_ratio=None,
    prune_layer=None,
    keep_ratio=None,
    exit_threshold=None,
    consistency_ratio=0.05,
    device=None,
    device_map=None,
    dtype="auto",
    attn_implementation="sdpa",
    max_tiles=None,
    min_pixels=None,
    max_pixels=None,
    guide_max_tiles=None,
    guide_max_crops=None,
    seed=0,
    importance_precision="fp32",
    draft=None,
    draft_tokens=4,
    batch_size=1,
    max_batch_size=None,
    **unknown,
) -> ModelArgs:
    """Validate everything the SGL models accept; see the README's table for meanings and defaults."""
    if unknown:
        allowed = sorted(parse_model_args.__code__.co_varnames[: parse_model_args.__code__.co_argcount])
        raise ValueError(f"unknown model argument(s) {sorted(unknown)}; allowed: {allowed}")
    if _none(pretrained):
        raise ValueError("pretrained=<large model path or hub id> is required")
    method = as_choice("method", method, METHODS)
    if method in ("sgl", "guide_only") and _none(guide):
        raise ValueError(f"method={method!r} needs guide=<small model path or hub id>")
    draft = None if _none(draft) else as_choice("draft", draft, DRAFT_SOURCES)
    if draft is not None and _none(guide):
        raise ValueError(f"draft={draft!r} needs guide=<small model path or hub id> (the drafting model)")
    settings_kwargs = {
        "method": method,
        "exit_threshold": as_float("exit_threshold", exit_threshold, allow_none=True),
        "consistency_ratio": as_float("consistency_ratio", consistency_ratio),
        "seed": as_int("seed", seed),
        "importance_precision": as_choice("importance_precision", importance_precision, PRECISIONS),
        "draft": draft,
        "draft_tokens": as_int("draft_tokens", draft_tokens, minimum=1),
    }
    if not _none(token_ratio):
        ratio = as_float("token_ratio", token_ratio)
        preset_layer, preset_keep = SGLSettings.preset(ratio)  # refuses a value that is no preset
        if not (_none(prune_layer) and _none(keep_ratio)):
            raise ValueError(
                f"token_ratio={token_ratio!r} is the paper preset prune_layer={preset_layer:g}, "
                f"keep_ratio={preset_keep:g}; give either token_ratio or prune_layer/keep_ratio, not both "
                f"(got prune_layer={prune_layer!r}, keep_ratio={keep_ratio!r})"
            )
        settings = SGLSettings.from_token_ratio(ratio, **settings_kwargs)
    else:
        defaults = SGLSettings()
        settings = SGLSettings(
            prune_layer=defaults.prune_layer if _none(prune_layer) else as_float("prune_layer", prune_layer),
            keep_ratio=defaults.keep_ratio if _none(keep_ratio) else as_float("keep_ratio", keep_ratio),
            **settings_kwargs,
        )
    guide_layout = {
        "guide_max_tiles": as_int("guide_max_tiles", guide_max_tiles, minimum=1, allow_none=True),
        "guide_max_crops": as_int("guide_max_crops", guide_max_crops, minimum=1, allow_none=True),
    }
    for name, value in guide_layout.items():
        if value is not None and method not in ("sgl", "guide_only"):
            raise ValueError(
                f"{name}={value} sets the guide's image layout; method={method!r} runs no guide "
                "(allowed with method 'sgl' or 'guide_only')"
            )
    pixels = {
        "min_pixels": as_int("min_pixels", min_pixels, minimum=1, allow_none=True),
        "max_pixels": as_int("max_pixels", max_pixels, minimum=1, allow_none=True),
    }
    if None not in pixels.values() and pixels["min_pixels"] > pixels["max_pixels"]:
        raise ValueError(
            f"min_pixels={pixels['min_pixels']} must be <= max_pixels={pixels['max_pixels']} "
            "(the image area range of Qwen-VL's dynamic resolution)"
        )
    batch = str(batch_size).strip()
    if batch.startswith("auto"):
        raise ValueError(f"batch_size={batch_size!r}: automatic batch sizes are not supported; give a number")
    return ModelArgs(
        pretrained=str(pretrained),
        guide=None if _none(guide) or not settings.needs_guide else str(guide),
        settings=settings,
        device=None if _none(device) else str(device),
        device_map=None if _none(device_map) else str(device_map),
        dtype=as_choice("dtype", dtype, DTYPES),
        attn_implementation=as_choice("attn_implementation", attn_implementation, LARGE_ATTENTION),
        max_tiles=as_int("max_tiles", max_tiles, minimum=1, allow_none=True),
        batch_size=as_int("batch_size", batch, minimum=1),
        **pixels,
        **guide_layout,
    )
