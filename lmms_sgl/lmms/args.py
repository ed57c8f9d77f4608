"""``--model_args`` for the SGL models: coerced from lmms-eval's strings and validated up front.

lmms-eval types values heuristically (``"0.35"`` -> float, ``"true"`` -> bool, ``"none"`` stays a
string), so every argument is coerced here, and every error names the argument, the value and
what is allowed, before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lmms_sgl.families.qwen_pixels import MODES as PREPROCESSING
from lmms_sgl.families.video import DEFAULT_NUM_FRAMES
from lmms_sgl.method.importance import PRECISIONS
from lmms_sgl.method.registry import METHODS, method_named, methods_where
from lmms_sgl.method.settings import DRAFT_SOURCES, SGLSettings
from lmms_sgl.method.spread import SELECTIONS

DTYPES = ("auto", "float32", "bfloat16", "float16")
# flops_reference: the layout flops_ratio_reference prices the large model alone at
FLOPS_REFERENCES = ("default", "run")
REFERENCE_LAYOUT = ("reference_max_tiles", "reference_min_pixels", "reference_max_pixels")
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


def as_bool(name: str, value, allow_none: bool = False) -> bool | None:
    if allow_none and _none(value):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r} must be true or false")


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
    preprocessing: str = "lmms_eval"
    guide_max_tiles: int | None = None
    guide_max_crops: int | None = None
    skip_units_asked: bool = False  # skip_units=true given explicitly (checked against the schedule)
    num_frames: int = DEFAULT_NUM_FRAMES  # frames sampled per video, guide and large alike
    flops_reference: str = "default"
    reference_max_tiles: int | None = None
    reference_min_pixels: int | None = None
    reference_max_pixels: int | None = None

    @property
    def reference_layout(self) -> dict:
        """The large model's layout arguments of the FLOPs reference (``flops_reference=default``;
        ``None``: the family's default), by the family's own argument names."""
        return {name.removeprefix("reference_"): getattr(self, name) for name in REFERENCE_LAYOUT}

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
    record_exit_score=False,
    device=None,
    device_map=None,
    dtype="auto",
    attn_implementation="sdpa",
    max_tiles=None,
    min_pixels=None,
    max_pixels=None,
    preprocessing="lmms_eval",
    guide_max_tiles=None,
    guide_max_crops=None,
    seed=0,
    importance_precision="fp32",
    skip_units=None,
    keep_units=None,
    keep_global_view=None,
    draft=None,
    draft_tokens=4,
    selection="auto",
    spread_radius=None,
    batch_size=1,
    max_batch_size=None,
    num_frames=DEFAULT_NUM_FRAMES,
    flops_reference="default",
    reference_max_tiles=None,
    reference_min_pixels=None,
    reference_max_pixels=None,
    **unknown,
) -> ModelArgs:
    """Validate everything the SGL models accept; see docs/arguments.md for meanings and defaults."""
    if unknown:
        allowed = sorted(parse_model_args.__code__.co_varnames[: parse_model_args.__code__.co_argcount])
        raise ValueError(f"unknown model argument(s) {sorted(unknown)}; allowed: {allowed}")
    if _none(pretrained):
        raise ValueError("pretrained=<large model path or hub id> is required")
    method = as_choice("method", method, METHODS)
    if method_named(method).uses_guide and _none(guide):
        raise ValueError(f"method={method!r} needs guide=<small model path or hub id>")
    draft = None if _none(draft) else as_choice("draft", draft, DRAFT_SOURCES)
    if draft is not None and _none(guide):
        raise ValueError(f"draft={draft!r} needs guide=<small model path or hub id> (the drafting model)")
    settings_kwargs = {
        "method": method,
        "exit_threshold": as_float("exit_threshold", exit_threshold, allow_none=True),
        "consistency_ratio": as_float("consistency_ratio", consistency_ratio),
        "record_exit_score": as_bool("record_exit_score", record_exit_score),
        "seed": as_int("seed", seed),
        "importance_precision": as_choice("importance_precision", importance_precision, PRECISIONS),
        "draft": draft,
        "draft_tokens": as_int("draft_tokens", draft_tokens, minimum=1),
        "selection": as_choice("selection", selection, SELECTIONS),
    }
    radius = as_int("spread_radius", spread_radius, minimum=0, allow_none=True)
    if radius is not None:
        if settings_kwargs["selection"] == "topk":
            raise ValueError(
                f"spread_radius={radius} applies to spreading; selection={selection!r} never spreads "
                f"(give selection=spread or auto with it; allowed selections: {SELECTIONS})"
            )
        settings_kwargs["spread_radius"] = radius
    skip = as_bool("skip_units", skip_units, allow_none=True)
    units = as_int("keep_units", keep_units, minimum=1, allow_none=True)
    global_view = as_bool("keep_global_view", keep_global_view, allow_none=True)
    if global_view is not None and units is None:
        raise ValueError(
            f"keep_global_view={global_view} applies to unit selection; give keep_units=N (N >= 1) with it"
        )
    settings_kwargs.update(
        skip_units=skip is not False,
        keep_units=units,
        keep_global_view=global_view is not False,
    )
    if skip and not method_named(method).plan_before_tower:
        allowed = " or ".join(repr(m) for m in methods_where(lambda m: m.plan_before_tower))
        raise ValueError(
            f"skip_units=true: method={method!r} does not drop tokens before the large model's first layer "
            f"(allowed with method {allowed} at prune_layer=0, or with keep_units)"
        )
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
        if units is not None:  # unit selection alone: every token of the kept units, from layer 0
            defaults = SGLSettings(prune_layer=0.0, keep_ratio=1.0)
        default_layer = 0.0 if method_named(method).zero_by_default else defaults.prune_layer
        settings = SGLSettings(
            prune_layer=default_layer if _none(prune_layer) else as_float("prune_layer", prune_layer),
            keep_ratio=defaults.keep_ratio if _none(keep_ratio) else as_float("keep_ratio", keep_ratio),
            **settings_kwargs,
        )
    guide_layout = {
        "guide_max_tiles": as_int("guide_max_tiles", guide_max_tiles, minimum=1, allow_none=True),
        "guide_max_crops": as_int("guide_max_crops", guide_max_crops, minimum=1, allow_none=True),
    }
    for name, value in guide_layout.items():
        if value is not None and not method_named(method).uses_guide:
            allowed = " or ".join(repr(m) for m in methods_where(lambda m: m.uses_guide))
            raise ValueError(
                f"{name}={value} sets the guide's image layout; method={method!r} runs no guide "
                f"(allowed with method {allowed})"
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
    reference = {
        "flops_reference": as_choice("flops_reference", flops_reference, FLOPS_REFERENCES),
        "reference_max_tiles": as_int("reference_max_tiles", reference_max_tiles, minimum=1, allow_none=True),
        "reference_min_pixels": as_int(
            "reference_min_pixels", reference_min_pixels, minimum=1, allow_none=True
        ),
        "reference_max_pixels": as_int(
            "reference_max_pixels", reference_max_pixels, minimum=1, allow_none=True
        ),
    }
    given = [name for name in REFERENCE_LAYOUT if reference[name] is not None]
    if given and reference["flops_reference"] == "run":
        raise ValueError(
            f"{', '.join(f'{n}={reference[n]}' for n in given)} sets the reference layout of "
            "flops_reference=default; flops_reference='run' prices the run's own layout "
            f"(allowed flops_reference values: {FLOPS_REFERENCES})"
        )
    low, high = reference["reference_min_pixels"], reference["reference_max_pixels"]
    if low is not None and high is not None and low > high:
        raise ValueError(f"reference_min_pixels={low} must be <= reference_max_pixels={high}")
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
        preprocessing=as_choice("preprocessing", preprocessing, PREPROCESSING),
        **guide_layout,
        skip_units_asked=bool(skip),
        num_frames=as_int("num_frames", num_frames, minimum=1),
        **reference,
    )


def check_schedule(args: ModelArgs, large_layers: int) -> None:
    """What needs the large model's layer count (read from its config, before weights load)."""
    args.settings.layer_k(large_layers)
    if args.skip_units_asked and not args.settings.skips_units(large_layers):
        layer_k = args.settings.layer_k(large_layers)
        raise ValueError(
            f"skip_units=true: prune_layer={args.settings.prune_layer} gives K={layer_k} of {large_layers} "
            "layers, so dropped tokens still reach layers 0..K-1 and every unit must be encoded "
            "(allowed: prune_layer=0, or keep_units=N)"
        )


def reject_repeated_arguments(arg_string: str) -> None:
    """Refuse ``--model_args`` that name an argument twice, with both values (lmms-eval's parser
    keeps the last one without a word)."""
    seen: dict[str, str] = {}
    for item in split_model_args(arg_string):
        name, _, value = item.partition("=")
        name = name.strip()
        if name in seen:
            raise ValueError(
                f"model argument {name!r} is given twice ({name}={seen[name]}, {name}={value}); give it once"
            )
        seen[name] = value


def split_model_args(model_args: str) -> list[str]:
    """``k=v`` entries of ``--model_args`` split on top-level commas (commas inside brackets or
    quotes stay), as lmms-eval splits them (JSON values may hold commas)."""
    parts, depth, quote, current = [], 0, None, []
    for char in model_args:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if "".join(current).strip():
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]
