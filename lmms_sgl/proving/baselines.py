"""The 2025 baselines (DivPrune, VisionZip, PDrop) against SGL on the proving ground, paired per sample.

The full study (:mod:`.study`, ``make study``) holds these methods at every ratio of both schedules.
This runs a chosen subset of the same points (same :class:`~.points.Point`, same cache, so the study
reuses them) and writes ``reports/baselines_2025.md``: accuracy, FLOPs and each method's paired
difference to SGL on the same samples, with its standard error
(``sd(d_i) / sqrt(n)``, d_i = method_i - sgl_i over the samples both ran).

    python -m lmms_sgl.proving.baselines --ratios 0.35 0.09 --limit 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loguru import logger

from lmms_sgl.method.cost import PAPER_PRESETS
from lmms_sgl.proving.points import FAMILIES, Point, run_point, schedule, summarize
from lmms_sgl.proving.study import BASELINES_2025, _num_layers, baseline_points
from lmms_sgl.reporting.paired import paired_gap


def paired_difference(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean of ``a - b`` over the samples both scored, its standard error, and how many there were."""
    gap = paired_gap(a["scores"], b["scores"])
    if gap[2] < 2:
        raise ValueError(f"paired difference needs at least two common samples, got {gap[2]}")
    return gap


def subset_points(family: str, num_layers: int, ratios: list[float], schedules: list[str]) -> list[Point]:
    """SGL and the 2025 baselines at ``ratios`` on the K = 1 schedule and / or the paper presets."""
    out = []
    for ratio in ratios:
        if "K=1" in schedules:
            prune_layer, keep = schedule(ratio, num_layers)
            out.append(Point(family, "sgl", prune_layer, keep, target_ratio=ratio))
            out += baseline_points(family, num_layers, ratio, prune_layer, keep, "K=1")
        if "preset" in schedules and ratio in PAPER_PRESETS:
            prune_layer, keep = PAPER_PRESETS[ratio]
            out.append(Point(family, "sgl", prune_layer, keep, target_ratio=ratio, schedule="preset"))
            out += baseline_points(family, num_layers, ratio, prune_layer, keep, "preset")
    return out


def table(rows: list[dict]) -> list[str]:
    """One family's rows: each baseline beside SGL on the same schedule and ratio."""
    lines = [
        "| schedule | target ratio | method | K | keep | measured ratio % | FLOPs % of large | accuracy % | "
        "paired difference to SGL (points ± s.e.) | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    sgl = {(r["schedule"], r["target_ratio"]): r for r in rows if r["method"] == "sgl"}
    for r in sorted(
        rows, key=lambda r: (r["schedule"], -r["target_ratio"], r["method"] != "sgl", r["method"])
    ):
        ref = sgl.get((r["schedule"], r["target_ratio"]))
        if r["method"] == "sgl" or ref is None:
            paired = "" if r["method"] == "sgl" else "no SGL run"
        else:
            gap, err, _ = paired_difference(r, ref)
            paired = f"{100 * gap:+.1f} ± {100 * err:.1f}"
        lines.append(
            f"| {r['schedule']} | {100 * r['target_ratio']:.0f} | {r['method']} | {r['layer_k']} | "
            f"{r['keep_ratio']:.3f} | {100 * r['token_ratio']:.1f} | {100 * r['flops_ratio']:.1f} | "
            f"{100 * r['accuracy']:.1f} | {paired} | {r['n']} |"
        )
    return lines


def plot(summaries: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against pipeline FLOPs (% of the large model alone), one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 4.2), squeeze=False)
    for ax, (family, rows) in zip(axes[0], summaries.items(), strict=True):
        for method, marker in zip(("sgl", *BASELINES_2025), "osD^", strict=True):
            for schedule_name, style in (("K=1", "-"), ("preset", ":")):
                curve = sorted(
                    (r for r in rows if r["method"] == method and r["schedule"] == schedule_name),
                    key=lambda r: r["flops_ratio"],
                )
                if curve:
                    ax.errorbar(
                        [100 * r["flops_ratio"] for r in curve],
                        [100 * r["accuracy"] for r in curve],
                        yerr=[100 * r["stderr"] for r in curve],
                        marker=marker,
                        linestyle=style,
                        capsize=3,
                        label=f"{method} ({schedule_name})",
                    )
        ax.set(title=family, xlabel="pipeline FLOPs, % of the large model alone", ylabel="exact match (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def what_ran(args) -> str:
    limit = "all test samples" if args.limit is None else f"the first {args.limit} test samples"
    return (
        f"families {', '.join(args.families)}, target ratios {', '.join(f'{r:g}' for r in args.ratios)}, "
        f"schedules {', '.join(args.schedules)}, {limit} (the same cached points as `make study`, which "
        "holds every ratio of both schedules)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/study"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.35, 0.09])
    parser.add_argument("--schedules", nargs="+", default=["K=1"], choices=["K=1", "preset"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args(argv)
    root = args.root.resolve()
    summaries: dict[str, list[dict]] = {}
    for family in args.families:
        num_layers = _num_layers(root / FAMILIES[family][1])
        rows = []
        for point in subset_points(family, num_layers, args.ratios, args.schedules):
            summary = summarize(run_point(point, root, args.work_dir, args.limit, args.batch_size))
            summary["layer_k"] = int(num_layers * summary["prune_layer"])
            rows.append(summary)
        summaries[family] = rows
    command = (
        f"python -m lmms_sgl.proving.baselines --ratios {' '.join(f'{r:g}' for r in args.ratios)} "
        f"--schedules {' '.join(args.schedules)}" + (f" --limit {args.limit}" if args.limit else "")
    )
    lines = [
        "# The 2025 baselines beside SGL on the proving ground (sgl_shapes)",
        "",
        f"Reproduce: `{command}` (points are cached in .cache/study and shared with `make study`).",
        "Every row is an lmms-eval run on the bundled `models/shapes-*` pairs. DivPrune and VisionZip",
        "prune before the language model (K = 0) and keep the schedule's layer-averaged ratio of the",
        "visual tokens; PDrop drops three times from the schedule's K with lambda solved for the same",
        "ratio; SGL prunes once at K. The paired difference is taken over the same samples.",
        "On the K = 1 schedule SGL and PDrop see every visual token in layer 0 and so keep far fewer",
        "from layer 1 on (at 9 %: 0.7 % of them) than DivPrune and VisionZip keep from layer 0 (9 %):",
        "the two pairs differ in where tokens are dropped, not only in which ones are kept.",
        f"What was run: {what_ran(args)}.",
        "",
    ]
    for family, rows in summaries.items():
        lines += [f"## {family}", "", *table(rows), ""]
    lines += ["![accuracy against pipeline FLOPs](baselines_2025.png)", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baselines_2025.md").write_text("\n".join(lines) + "\n")
    (args.out / "baselines_2025.json").write_text(json.dumps({"command": command, "summaries": summaries}))
    plot(summaries, args.out / "baselines_2025.png")
    logger.info(f"wrote {args.out / 'baselines_2025.md'}")


if __name__ == "__main__":
    main()
