"""Arguments of ``lmms-sgl-cost``: parsed and checked before any config is read.

Every refusal names the argument, its value and what is allowed (exit code 2, as argparse's own
errors). Shared by the command and by the real-pair table of docs/cost.md, which is built from argument
lists so that it says exactly what a user would type.
"""

import argparse
from pathlib import Path

from lmms_sgl.costs.layout import ImageLayout, LayoutError, internvl_layout, llava_layout, qwen_layout
from lmms_sgl.costs.methods import Options, Side, Workload
from lmms_sgl.costs.sources import Checkpoint, SourceError, read_checkpoint
from lmms_sgl.method.cost import TransformerShape

QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # the Qwen-VL image processors' defaults


def _grid(text: str) -> tuple[int, int]:
    columns, sep, rows = text.lower().partition("x")
    if not sep or not columns.isdigit() or not rows.isdigit() or int(columns) < 1 or int(rows) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not COLUMNSxROWS with positive integers (e.g. 3x3)")
    return int(columns), int(rows)


def _size(text: str) -> tuple[int, int]:
    try:
        return _grid(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels (e.g. 1344x1008)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmms-sgl-cost",
        description="Analytic FLOPs of large-only, guide-only, SGL presets, FastV, K=0, unit skipping and "
        "unit selection for one request, from the checkpoints' config.json (offline).",
    )
    parser.add_argument("--guide", help="bundled config name, local folder or cached hub id")
    parser.add_argument("--large", help="bundled config name, local folder or cached hub id")
    parser.add_argument(
        "--real-pairs", action="store_true", help="print the table of the bundled real pairs (docs/cost.md)"
    )
    layout = parser.add_argument_group("image layout (one per family)")
    layout.add_argument("--tiles", type=int, help="InternVL: tiles (a thumbnail is added when > 1)")
    layout.add_argument("--crops", type=_grid, help="LLaVA-NeXT / OneVision: crop grid COLUMNSxROWS")
    layout.add_argument("--image-size", type=_size, help="Qwen-VL: image WIDTHxHEIGHT in pixels")
    layout.add_argument("--min-pixels", type=int, default=QWEN_MIN_PIXELS, help="Qwen-VL resize bound")
    layout.add_argument("--max-pixels", type=int, default=QWEN_MAX_PIXELS, help="Qwen-VL resize bound")
    layout.add_argument("--guide-tiles", type=int, help="InternVL: the guide's own (cheaper) tile count")
    layout.add_argument("--guide-crops", type=_grid, help="LLaVA any-resolution: the guide's own crop grid")
    work = parser.add_argument_group("request")
    work.add_argument("--prompt-tokens", type=int, default=64, help="text tokens of the prompt (default 64)")
    work.add_argument("--answer-tokens", type=int, default=8, help="answer length in tokens (default 8)")
    points = parser.add_argument_group("operating points")
    points.add_argument("--units", type=int, help="unit selection: keep this many tiles / crops")
    points.add_argument(
        "--no-global-view", action="store_true", help="unit selection without the thumbnail / base image"
    )
    points.add_argument("--exit-rate", type=float, help="fraction of requests the guide answers, in [0, 1)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range checks that need no config (before anything is read)."""
    if not args.real_pairs and (args.guide is None or args.large is None):
        parser.error("--guide and --large are required (or --real-pairs for the bundled pairs' table)")
    positive = ("tiles", "guide_tiles", "answer_tokens", "units", "min_pixels", "max_pixels")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: allowed: an integer >= 1")
    if args.prompt_tokens < 0:
        parser.error(f"--prompt-tokens={args.prompt_tokens}: allowed: an integer >= 0")
    if args.exit_rate is not None and not 0.0 <= args.exit_rate < 1.0:
        parser.error(f"--exit-rate={args.exit_rate}: allowed: a fraction in [0, 1)")
    if args.min_pixels > args.max_pixels:
        parser.error(f"--min-pixels={args.min_pixels}: allowed: at most --max-pixels={args.max_pixels}")
    if args.no_global_view and args.units is None:
        parser.error("--no-global-view applies to unit selection: give --units N as well")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json={str(args.json)!r}: allowed: a file in an existing folder")


FAMILY_ARGUMENTS = {
    "internvl": ("tiles", "guide_tiles"),
    "llava": ("crops", "guide_crops"),
    "qwen_vl": ("image_size",),
}


def layout_of(checkpoint: Checkpoint, args: argparse.Namespace, guide: bool) -> ImageLayout:
    """The image layout of one checkpoint from the arguments its family takes."""
    config = checkpoint.config
    if checkpoint.family == "internvl":
        if args.tiles is None:
            raise LayoutError("--tiles is required for InternVL checkpoints (e.g. --tiles 6)")
        return internvl_layout(config, args.guide_tiles if guide and args.guide_tiles else args.tiles)
    if checkpoint.family == "llava":
        crops = args.guide_crops if guide and args.guide_crops else args.crops
        return llava_layout(config, crops, "--guide-crops" if guide and args.guide_crops else "--crops")
    if args.image_size is None:
        raise LayoutError("--image-size is required for Qwen-VL checkpoints (e.g. --image-size 1344x1008)")
    return qwen_layout(config, args.image_size, args.min_pixels, args.max_pixels)


def check_family_arguments(large: Checkpoint, guide: Checkpoint, args: argparse.Namespace) -> None:
    if large.family != guide.family:
        raise LayoutError(
            f"--guide={guide.source!r} is {guide.family} and --large={large.source!r} is {large.family}; "
            "allowed: a guide of the large model's family"
        )
    allowed = FAMILY_ARGUMENTS[large.family]
    for name in ("tiles", "guide_tiles", "crops", "guide_crops", "image_size"):
        if getattr(args, name) is not None and name not in allowed:
            option = "--" + name.replace("_", "-")
            takes = ", ".join("--" + a.replace("_", "-") for a in allowed)
            raise LayoutError(f"{option}: {large.family} checkpoints take {takes}")


def sides(args: argparse.Namespace) -> tuple[Side, Side, Side | None]:
    """(large, guide, guide at its own cheaper layout or None), everything validated."""
    large = read_checkpoint(args.large, "--large")
    guide = read_checkpoint(args.guide, "--guide")
    check_family_arguments(large, guide, args)
    large_layout = layout_of(large, args, guide=False)
    shape = TransformerShape.from_text_config
    large_side = Side(large.name, shape(large.config.text_config), large_layout)
    full_guide = Side(guide.name, shape(guide.config.text_config), layout_of(guide, args, guide=False))
    small = None
    if args.guide_tiles is not None or args.guide_crops is not None:
        small = Side(guide.name, full_guide.text, layout_of(guide, args, guide=True))
    if args.units is not None:
        local = len(large_layout.local_units)
        if not large_layout.skippable or local < 1:
            raise LayoutError(
                f"--units={args.units}: the large model's image is one unit ({large_layout.description}); "
                "unit selection needs InternVL tiles or LLaVA any-resolution crops"
            )
        if args.units > local:
            raise LayoutError(f"--units={args.units}: allowed: at most the layout's {local} tiles / crops")
    return large_side, full_guide, small


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Side, Side, Options, Workload]:
    """Arguments, then configs, validated in that order (argparse exits 2 with the message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.real_pairs:
        return args, None, None, None, None
    try:
        large, guide, small = sides(args)
    except (SourceError, LayoutError) as error:
        parser.error(str(error))
    options = Options(args.units, not args.no_global_view, small, args.exit_rate)
    return args, large, guide, options, Workload(args.prompt_tokens, args.answer_tokens)
