"""Proving ground, guidance across resolutions: a 1-tile guide steering a 2-tile + thumbnail large model.

On ``sgl_shapes_wide`` (896 x 448 px) the InternVL large model sees two tiles and a thumbnail (768
visual tokens). The guide either sees the same layout (index transfer, as before) or one tile
(``guide_max_tiles=1``: 256 tokens, mapped onto the large model's tokens by image geometry). Both
run the study's shared K = 1 schedule at 35 % and 9 %; every point is one lmms-eval run of the
study's kind (``lmms_sgl.proving.points.run_point``, cached the same way).

``python -m lmms_sgl.proving.resolution`` writes ``reports/proving_ground_resolution.json``, its plot,
and the section of ``reports/proving_ground.md`` between the markers below (appended if absent).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from loguru import logger

from lmms_sgl.proving.points import (
    WIDE_RATIOS,
    WIDE_TASK,
    Point,
    ratio_stderr,
    run_point,
    schedule,
    summarize,
    write_section,
)
from lmms_sgl.reporting.paired import mean_stderr
from lmms_sgl.reporting.sections import insert_marked_section

START, END = "<!-- guidance-across-resolutions:start -->", "<!-- guidance-across-resolutions:end -->"
GUIDE_TILES = (None, 1)  # None: the large model's layout


def points(num_layers: int) -> list[Point]:
    out = [Point("internvl", "large_only", task=WIDE_TASK)]
    out += [Point("internvl", "guide_only", task=WIDE_TASK, guide_max_tiles=t) for t in GUIDE_TILES]
    for ratio in WIDE_RATIOS:
        prune_layer, keep = schedule(ratio, num_layers)
        out.append(Point("internvl", "random", prune_layer, keep, target_ratio=ratio, task=WIDE_TASK))
        out += [
            Point("internvl", "sgl", prune_layer, keep, target_ratio=ratio, task=WIDE_TASK, guide_max_tiles=t)
            for t in GUIDE_TILES
        ]
    return out


def describe(payload: dict, large: dict | None, num_layers: int) -> dict:
    """One point's numbers: accuracy, retained, guide FLOPs, flops_ratio, fallbacks, layouts."""
    rows = payload["rows"]
    summary = summarize(payload)
    flops = [r["flops"] or 0.0 for r in rows]
    alone = [r["flops_large_alone"] or 0.0 for r in rows]
    guide_flops = [(r.get("extra") or {}).get("guide_flops") for r in rows]
    guide_flops = [g for g in guide_flops if g is not None]
    extras = [r.get("extra") or {} for r in rows]
    out = {
        **summary,
        "num_layers": num_layers,
        "flops_ratio_stderr": ratio_stderr(flops, alone),
        "guide_flops": mean_stderr(guide_flops) if guide_flops else None,
        "guide_flops_ratio": sum(guide_flops) / sum(alone) if guide_flops and sum(alone) else None,
        "mapped": sum(e.get("transfer") == "geometric" for e in extras),
        "fallbacks": sum(1 for r in rows if (r.get("extra") or {}).get("failed") or r.get("fallback")),
        "guide_layouts": sorted({e["guide_layout"] for e in extras if "guide_layout" in e}),
        "large_layouts": sorted({e["large_layout"] for e in extras if "large_layout" in e}),
    }
    if large is not None:
        correct = [r["exact_match"] for r in rows]
        reference = [r["exact_match"] for r in large["rows"]]
        out["retained"] = summary["accuracy"] / large["accuracy"]
        out["retained_stderr"] = ratio_stderr(correct, reference)
    return out


def run(root: Path, work_dir: Path, limit: int | None, batch_size: int) -> dict:
    config = json.loads((root / "models/shapes-internvl-large/config.json").read_text())
    num_layers = config["text_config"]["num_hidden_layers"]
    payloads = {p: run_point(p, root, work_dir, limit, batch_size) for p in points(num_layers)}
    large = next(v for p, v in payloads.items() if p.method == "large_only")
    rows = []
    for point, payload in payloads.items():
        row = {**describe(payload, large, num_layers), "guide_max_tiles": point.guide_max_tiles}
        if point.guide_max_tiles is not None:  # paired over the same samples: minus the large layout
            same = next(
                v
                for p, v in payloads.items()
                if (p.method, p.target_ratio, p.guide_max_tiles) == (point.method, point.target_ratio, None)
            )
            diffs = [
                a["exact_match"] - b["exact_match"]
                for a, b in zip(payload["rows"], same["rows"], strict=True)
            ]
            row["gap"], row["gap_stderr"] = mean_stderr(diffs)
        rows.append(row)
    return {"task": WIDE_TASK, "limit": limit, "rows": rows}


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _guide_label(row: dict) -> str:
    if row["method"] == "random":
        return "- (no guide)"
    return (
        "large layout (2 tiles + thumbnail)"
        if row["guide_max_tiles"] is None
        else f"{row['guide_max_tiles']} tile"
    )


def section(data: dict, command: str) -> list[str]:
    """The report section (markdown lines, markers included)."""
    rows = data["rows"]
    large = next(r for r in rows if r["method"] == "large_only")
    n = large["n"]
    lines = [
        START,
        f"## internvl, guidance across resolutions: `{WIDE_TASK}`, guide at 1 tile vs at the large layout",
        "",
        f"Reproduce: `{command}`. The large model sees 2 tiles + thumbnail (768 visual tokens); the guide",
        "sees either the same layout (importance transferred by index) or one tile (256 tokens,",
        "`guide_max_tiles=1`; importance mapped onto the large model's tokens by area-weighted overlap,",
        "`lmms_sgl.method.transfer`). Shared K = 1 schedule as above. "
        f"n = {n}{'' if data['limit'] is None else f' (first {n} test samples: --limit)'}; "
        '"±" is one standard error (binomial for accuracy, ratio estimator for retained and FLOPs).',
        f"Large model alone: {_pct(large['accuracy'])} ± {_pct(large['stderr'])} %. The models were trained "
        "on single 448 px tiles only, so every method scores low here; the random-token rows (no guide, same "
        "schedule) show how much of the accuracy the choice of tokens decides.",
        "",
        "| method | target ratio | guide sees | accuracy % | ± | retained % | ± | guide FLOPs (M/sample) | "
        "guide FLOPs % of large | pipeline flops_ratio % | ± | mapped | fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "large_only":
            continue
        guide = r["guide_flops"]
        lines.append(
            f"| {r['method']} | {'' if r['target_ratio'] is None else _pct(r['target_ratio'], 0)} | "
            f"{_guide_label(r)} | {_pct(r['accuracy'])} | {_pct(r['stderr'])} | {_pct(r.get('retained'))} | "
            f"{_pct(r.get('retained_stderr'))} | "
            f"{'n/a' if guide is None else f'{guide[0] / 1e6:.1f}'} | {_pct(r['guide_flops_ratio'])} | "
            f"{_pct(r['flops_ratio'])} | {_pct(r['flops_ratio_stderr'], 2)} | "
            f"{r['mapped']} | {r['fallbacks']} |"
        )
    lines += [
        "",
        *findings(rows),
        "",
        "![guide at 1 tile vs at the large layout](proving_ground_resolution.png)",
    ]
    return [*lines, END]


def findings(rows: list[dict]) -> list[str]:
    out = []
    for ratio in sorted({r["target_ratio"] for r in rows if r["target_ratio"] is not None}, reverse=True):
        same, low = (
            next(
                r for r in rows if (r["method"], r["target_ratio"], r["guide_max_tiles"]) == ("sgl", ratio, t)
            )
            for t in GUIDE_TILES
        )
        control = next((r for r in rows if (r["method"], r["target_ratio"]) == ("random", ratio)), None)
        versus = (
            ""
            if control is None
            else f"; random tokens at the same ratio: {_pct(control.get('retained'))} ± "
            f"{_pct(control.get('retained_stderr'))} %"
        )
        out.append(
            f"- At {_pct(ratio, 0)} %: the 1-tile guide retains {_pct(low.get('retained'))} % of the large "
            f"model's accuracy (same-layout guide: {_pct(same.get('retained'))} %; paired difference "
            f"{100 * low['gap']:+.1f} ± {100 * low['gap_stderr']:.1f} points{versus}) and brings the "
            "pipeline's FLOPs from "
            f"{_pct(same['flops_ratio'])} % to {_pct(low['flops_ratio'])} % of the large model alone "
            f"(guide share {_pct(same['guide_flops_ratio'])} % -> {_pct(low['guide_flops_ratio'])} %)."
        )
    return out


def _label_ratios(ax, rows: list[dict]) -> None:
    """Write each point's target token ratio next to it."""
    for r in rows:
        ax.annotate(
            f"{_pct(r['target_ratio'], 0)} %",
            (100 * r["flops_ratio"], 100 * r["retained"]),
            textcoords="offset points",
            xytext=(6, -10),
            fontsize=8,
        )


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for tiles, marker in zip(GUIDE_TILES, "os", strict=True):
        curve = [r for r in rows if r["method"] == "sgl" and r["guide_max_tiles"] == tiles]
        ax.errorbar(
            [100 * r["flops_ratio"] for r in curve],
            [100 * r["retained"] for r in curve],
            xerr=[100 * r["flops_ratio_stderr"] for r in curve],
            yerr=[100 * r["retained_stderr"] for r in curve],
            marker=marker,
            linestyle="",
            capsize=3,
            label=f"guide: {_guide_label(curve[0])}",
        )
        _label_ratios(ax, curve)
    control = [r for r in rows if r["method"] == "random"]
    if control:
        ax.errorbar(
            [100 * r["flops_ratio"] for r in control],
            [100 * r["retained"] for r in control],
            yerr=[100 * r["retained_stderr"] for r in control],
            marker="x",
            linestyle="",
            capsize=3,
            color="grey",
            label="random tokens (no guide)",
        )
        _label_ratios(ax, control)
    ax.axhline(100, color="grey", linestyle="-", label="large_only")
    ax.set(
        title=f"internvl on {WIDE_TASK}: SGL, large model 2 tiles + thumbnail",
        xlabel="pipeline FLOPs (% of the large model alone)",
        ylabel="accuracy retained (% of large_only)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: Path, data: dict, command: str) -> Path:
    """JSON, plot, and the marked section of ``proving_ground.md`` (replaced in place, or appended)."""
    lines = section(data, command)
    return write_section(out_dir, "proving_ground_resolution", data, command, plot, lines, START, END)


def insert_section(path: Path, lines: list[str]) -> Path:
    return insert_marked_section(path, lines, START, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (models/, tasks/)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where the report and plot go")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/study"), help="cached finished points")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test samples")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    command = "python -m lmms_sgl.proving.resolution" + (f" --limit {args.limit}" if args.limit else "")
    data = run(args.root.resolve(), args.work_dir, args.limit, args.batch_size)
    logger.info(f"wrote {write(args.out, data, command)}")


if __name__ == "__main__":
    main()
