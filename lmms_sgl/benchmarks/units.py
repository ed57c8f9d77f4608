"""Benchmark, pay only for what is kept: a pair shaped like InternVL2-2B -> 26B in its vision /
language split, at 6 tiles + thumbnail (1,792 large-model visual tokens).

The 26B's InternViT-6B is 53 % of its prefill at 7 tiles (84 of 157 TFLOPs, ``lmms-sgl-cost``); the
benchmark pair of :mod:`.common` has a tiny vision tower (12 %), so unit skipping and unit selection
would look worthless there. :data:`UNITS_PAIR` keeps the 24-layer large LM (the presets' K) and
sizes the large vision tower so that the same analytic formulas (``config_tile_flops``,
``cost.prefill_flops``) give the real split (54.0 %); the guide is smaller by roughly the real ratios (LM
prefill 1/8 of the large one, real 1/12; vision tower 1/29 per tile, real 1/20). ``--smoke``: a tiny
pair and four rows.

Rows: the large model alone at 7 tiles (the reference of every ratio), downsampled (``max_tiles``
1 and 2), SGL at the paper's presets, K = 0 at 9 % without and with unit skipping, unit selection
with 2 and 3 tiles (+ thumbnail), each SGL row with the guide at the large layout and at one tile
(``guide_max_tiles=1``). Time and FLOPs ratios come from one run, configurations interleaved after
a warm-up round, medians (as :mod:`.resolution`). Every row is also priced on InternVL2-2B -> 26B
(:mod:`.real_pair`: same operating point, same request, the keep sets' encoded tiles as measured),
and the goals are judged on that ratio: this pair's language model (24 x 256) spends a larger share
of its prefill on attention than InternLM2-20B, so pruning saves more here than there.

    python -m lmms_sgl.benchmarks.units --out reports/benchmarks.md   # tens of minutes here
    python -m lmms_sgl.benchmarks.units --smoke --out /tmp/bench.md   # tiny sizes, seconds
    python -m lmms_sgl.benchmarks.units --real-dims --device cuda --dtype bfloat16 --out bench.md
    python -m lmms_sgl.benchmarks.units --render --out reports/benchmarks.md  # the section from the JSON

Writes ``benchmarks_units.json`` next to ``--out`` and the marked section of ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from lmms_sgl.benchmarks import real_pair
from lmms_sgl.benchmarks.common import (
    IMAGES,
    QUESTION,
    Setup,
    add_setup_arguments,
    at_tiles,
    load_pair,
    machine,
    prompt_text_tokens,
    saved_specs,
    setup_from,
    text_shape,
    timed_generations,
)
from lmms_sgl.benchmarks.real_pair import Point
from lmms_sgl.factory.specs import ModelSpec, TextSpec, VisionSpec
from lmms_sgl.families import LoadedVLM, Prompt
from lmms_sgl.method.settings import PAPER_PRESETS, SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline
from lmms_sgl.reporting.sections import insert_marked_section

START, END = "<!-- units-benchmark:start -->", "<!-- units-benchmark:end -->"
N_VISUAL = 1792
LARGE_TILES = 6  # + thumbnail: the reference layout of every ratio
GOAL_FLOPS, GOAL_TIME = 0.30, 0.40
GOAL_ROW = "units 2 of 7 (no thumbnail), guide at 1 tile"

UNITS_PAIR = {
    "guide": ModelSpec(
        "units-guide", "internvl", "guide", TextSpec(128, 8, 4, 1, 352), VisionSpec(64, 2, 2, 256), seed=51
    ),
    "large": ModelSpec(
        "units-large",
        "internvl",
        "large",
        TextSpec(256, 24, 4, 2, 704),
        VisionSpec(256, 9, 4, 1024),
        seed=52,
    ),
}
SMOKE_PAIR = {
    "guide": ModelSpec(
        "units-smoke-guide",
        "internvl",
        "guide",
        TextSpec(64, 2, 4, 2, 128),
        VisionSpec(32, 1, 2, 64),
        seed=53,
    ),
    "large": ModelSpec(
        "units-smoke-large",
        "internvl",
        "large",
        TextSpec(96, 8, 4, 2, 192),
        VisionSpec(128, 2, 4, 256),
        seed=54,
    ),
}


def points() -> dict[str, Point]:
    """Every row's operating point, ``large_only`` at 7 tiles first (the reference): the pipeline
    is built from it and the real pair priced with it."""
    guides = {"guide at the large layout": LARGE_TILES, "guide at 1 tile": 1}
    out = {"large_only": Point(LARGE_TILES, method="large_only")}
    for tiles in (1, 2):
        out[f"large_only, max_tiles={tiles}"] = Point(tiles, method="large_only")
    for ratio, (prune_layer, keep) in sorted(PAPER_PRESETS.items(), reverse=True):
        for name, tiles in guides.items():
            out[f"SGL {ratio:.0%}, {name}"] = Point(
                LARGE_TILES, tiles, prune_layer=prune_layer, keep_ratio=keep
            )
    for name, tiles in guides.items():
        for skip in (False, True):
            out[f"K=0 9 %, {'unit skipping' if skip else 'no skipping'}, {name}"] = Point(
                LARGE_TILES, tiles, prune_layer=0.0, keep_ratio=0.09, skip_units=skip
            )
    for units in (2, 3):
        for name, tiles in guides.items():
            out[f"units {units} + thumbnail, {name}"] = Point(
                LARGE_TILES, tiles, prune_layer=0.0, keep_units=units
            )
    out[GOAL_ROW] = Point(LARGE_TILES, 1, prune_layer=0.0, keep_units=2, keep_global=False)
    return out


def settings_of(point: Point) -> SGLSettings:
    if point.method == "large_only":
        return SGLSettings(method="large_only")
    if point.keep_units is not None:  # every token of the kept units, from layer 0
        return SGLSettings(
            prune_layer=0.0, keep_ratio=1.0, keep_units=point.keep_units, keep_global_view=point.keep_global
        )
    return SGLSettings(
        method=point.method,
        prune_layer=point.prune_layer,
        keep_ratio=point.keep_ratio,
        skip_units=point.skip_units,
        # the paper's top-k, as these rows were measured: the default (auto) spreads at K = 0, which
        # touches every tile and leaves unit skipping nothing to skip
        **({"selection": "topk"} if point.method == "sgl" else {}),
    )


def configurations(guide: LoadedVLM, large: LoadedVLM) -> dict[str, SGLPipeline]:
    """Every row's pipeline, built from :func:`points`."""
    return {
        name: SGLPipeline(
            at_tiles(large, point.large_tiles),
            None if point.guide_tiles is None else at_tiles(guide, point.guide_tiles),
            settings_of(point),
        )
        for name, point in points().items()
    }


SMOKE_ROWS = (
    "large_only",
    "K=0 9 %, no skipping, guide at 1 tile",
    "K=0 9 %, unit skipping, guide at 1 tile",
    GOAL_ROW,
)


def shapes(specs: dict) -> str:
    def one(spec: ModelSpec) -> str:
        return (
            f"LM {spec.text.num_hidden_layers} x {spec.text.hidden_size}, "
            f"vision {spec.vision.num_hidden_layers} x {spec.vision.hidden_size}"
        )

    return f"large {one(specs['large'])} (1,025 patches per tile); guide {one(specs['guide'])}"


def measure(
    specs: dict, new_tokens: int, rounds: int, only: tuple[str, ...] | None = None, setup: Setup | None = None
) -> dict:
    guide, large = load_pair(specs, setup)
    configs = configurations(guide, large)
    if only is not None:
        configs = {name: configs[name] for name in only}
    sample = Sample("bench", 0, Prompt(QUESTION, [Image.new("RGB", IMAGES[N_VISUAL], (90, 140, 200))]))
    gen = GenerationSettings(max_new_tokens=new_tokens)
    measured, load = timed_generations(configs, sample, gen, rounds)
    alone_seconds = statistics.median(t for t, _ in measured["large_only"])
    alone = measured["large_only"][-1][1]
    rows = []
    for name, runs in measured.items():
        record = runs[-1][1]
        seconds = statistics.median(t for t, _ in runs)
        rows.append(
            {
                "config": name,
                "seconds": seconds,
                "time_ratio": seconds / alone_seconds,
                "flops_ratio": record.flops / alone.flops,
                "guide_flops_ratio": record.extra.get("guide_flops", 0.0) / alone.flops,
                "units": f"{record.vision_units_encoded}/{record.vision_units}"
                if record.vision_units is not None
                else "-",
                "visual_tokens": record.total_visual,
                "kept_visual": record.kept_visual,
                "answer": record.answer,
                "fallback": record.fallback,
            }
        )
    by_name = {r["config"]: r for r in rows}
    identical = {
        name: by_name[f"K=0 9 %, unit skipping, {name}"]["answer"]
        == by_name[f"K=0 9 %, no skipping, {name}"]["answer"]
        for name in ("guide at the large layout", "guide at 1 tile")
        if f"K=0 9 %, unit skipping, {name}" in by_name
    }
    return {
        "machine": machine(),
        **({"setup": setup.as_dict()} if setup is not None else {}),
        "load_average": load,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "prompt_text_tokens": alone.input_tokens - alone.total_visual,
        "skip_answers_identical": identical,
        "rows": rows,
    }


def real_pair_ratios(results: dict, prompt: int = real_pair.PROMPT_TOKENS) -> dict[str, float]:
    """Each row's operating point priced on the real pair, over its large model alone at 7 tiles
    (``prompt`` text tokens, the benchmark's answer length; the encoded tiles of unit skipping as
    measured)."""
    answer, table = results["new_tokens"], points()
    out = {}
    for row in results["rows"]:
        encoded = int(row["units"].split("/")[0]) if "/" in str(row["units"]) else None
        out[row["config"]] = real_pair.ratio(
            table[row["config"]], prompt, answer, LARGE_TILES, encoded_units=encoded
        )
    return out


def attention_shares(results: dict, specs: dict) -> str:
    """The two language models' split of prefill FLOPs at the benchmark's length."""
    tokens = N_VISUAL + (results.get("prompt_text_tokens") or prompt_text_tokens(N_VISUAL))
    return real_pair.attention_note(text_shape(specs["large"]), tokens)


def vision_share(specs: dict) -> float:
    """The large model's vision tower as a share of its prefill at 7 tiles (analytic formulas)."""
    from lmms_sgl.factory.build import build_config, build_tokenizer
    from lmms_sgl.families.internvl import config_tile_flops
    from lmms_sgl.method.cost import TransformerShape, prefill_flops

    config = build_config(specs["large"], build_tokenizer("internvl"))
    vision = 7 * config_tile_flops(config)
    text = prefill_flops(TransformerShape.from_text_config(config.text_config), N_VISUAL + 40)
    return vision / (vision + text)


def section(results: dict, command: str, specs: dict | None = None) -> list[str]:
    by_name = {r["config"]: r for r in results["rows"]}
    real = real_pair_ratios(results)
    goal = by_name[GOAL_ROW]
    goal_real = real[GOAL_ROW]
    own_prompt = results.get("prompt_text_tokens") or prompt_text_tokens(N_VISUAL)
    goal_own_prompt = real_pair_ratios(results, own_prompt)[GOAL_ROW]
    met_flops = goal_real <= GOAL_FLOPS
    met_time = goal["time_ratio"] <= GOAL_TIME and goal_real <= GOAL_TIME
    specs = specs or UNITS_PAIR
    lines = [
        START,
        "## Pay only for what is kept: a 26B-shaped pair at 6 tiles + thumbnail",
        "",
        f"Reproduce: `{command}` (raw numbers: `benchmarks_units.json`). The large model's vision tower "
        f"is {results['vision_share']:.1%} of its prefill at 7 tiles by the analytic formulas "
        f"(InternVL2-26B: 53 %); {results['shapes']}. One sample, {N_VISUAL} large-model visual tokens, "
        f"no exit, {results['new_tokens']} new tokens, {results['rounds']} interleaved rounds after a "
        "warm-up (medians). Ratios are to the large model alone at 7 tiles, measured in the same run; "
        "`units` is encoded / total for the large model's vision tower. The last FLOPs column prices the "
        f"same operating point on {real_pair.LABEL} (bundled configs; {real_pair.PROMPT_TOKENS} prompt text "
        "tokens as `lmms-sgl-cost`, the same answer length, the keep sets' encoded tiles as measured; "
        "`lmms_sgl/benchmarks/real_pair.py`); goals are judged on it. " + attention_shares(results, specs),
        "",
        "| configuration | units | kept / visual tokens | seconds | time ratio | FLOPs ratio | "
        f"guide FLOPs / large alone | FLOPs ratio on {real_pair.LABEL} | answer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['config']} | {r['units']} | {r['kept_visual']} / {r['visual_tokens']} | "
            f"{r['seconds']:.3f} | {r['time_ratio']:.3f} | {r['flops_ratio']:.3f} | "
            f"{r['guide_flops_ratio']:.3f} | {real[r['config']]:.3f} | "
            f"{r['answer']!r} |"
        )
    identical = results["skip_answers_identical"]
    lines += [
        "",
        f"Goal (issue 26): the one-tile guide choosing 2 of the 7 units at <= {GOAL_FLOPS}x of the large "
        f"model's FLOPs and <= {GOAL_TIME}x of its time (`{GOAL_ROW}`): on {real_pair.LABEL} the operating "
        f"point costs {goal_real:.3f}x FLOPs: **{'met' if met_flops else 'not met'}** (this pair: "
        f"{goal['flops_ratio']:.3f}x; the real pair with this benchmark's {own_prompt} prompt text tokens: "
        f"{goal_own_prompt:.3f}x, so the goal sits at the margin); time: {goal['time_ratio']:.3f}x measured "
        "on this pair, "
        f"{'met' if met_time else 'not met'} (judged on both the measurement and the real pair's FLOPs "
        f"ratio, {goal_real:.3f}x, the floor of its time ratio when compute-bound; real-pair time is "
        "unmeasured: `--real-dims --device cuda` measures it).",
        "Exact unit skipping at K = 0: answers identical to K = 0 without skipping: "
        + ", ".join(f"{name}: {'yes' if same else 'NO'}" for name, same in identical.items())
        + "; its saving is the difference of the two rows' ratios for the keep sets this guide produced.",
        f"1-minute load average before / after: {results['load_average'][0]:.1f} / "
        f"{results['load_average'][1]:.1f} on {results['machine']['cores']} cores.",
        *([results["notes"]] if results.get("notes") else []),
        END,
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks.md"))
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models (or the --real-dims ones), four rows, one round"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--render", action="store_true", help="rewrite the section from benchmarks_units.json (no measuring)"
    )
    add_setup_arguments(parser)
    args = parser.parse_args(argv)
    raw = args.out.with_name("benchmarks_units.json")
    if args.render:
        if not raw.exists():
            parser.error(f"--render: {raw} is missing; measure first")
        results = json.loads(raw.read_text())
        render(results, args.out)
        print(args.out)
        return
    setup = setup_from(parser, args)
    torch.set_num_threads(2)
    specs = setup.specs(SMOKE_PAIR if args.smoke else UNITS_PAIR)
    if args.smoke:
        results = measure(specs, 2, 1, SMOKE_ROWS, setup)
    else:
        results = measure(specs, 8, args.rounds, setup=setup)
    results["vision_share"], results["shapes"] = vision_share(specs), shapes(specs)
    results["specs"] = {role: asdict(spec) for role, spec in specs.items()}
    results["command"] = " ".join(
        part
        for part in (
            "python -m lmms_sgl.benchmarks.units",
            "--smoke" if args.smoke else f"--rounds {args.rounds}",
            setup.arguments(),
            f"--out {args.out}",
        )
        if part
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=2) + "\n")
    render(results, args.out)
    print(args.out)


def render(results: dict, out: Path) -> None:
    """The marked section of ``out`` from saved results (the command saved with them)."""
    specs = saved_specs(results, UNITS_PAIR)
    command = (
        results.get("command")
        or f"python -m lmms_sgl.benchmarks.units --rounds {results['rounds']} --out {out}"
    )
    insert_marked_section(out, section(results, command, specs), START, END)


if __name__ == "__main__":
    main()
