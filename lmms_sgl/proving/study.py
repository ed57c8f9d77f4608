"""The proving-ground study: does a small model's guidance keep a large model's accuracy?

Every point is one lmms-eval evaluation of ``sgl_internvl2`` / ``sgl_llava`` on the ``sgl_shapes`` test
task with the bundled trained pairs (``models/shapes-*``), run through ``lmms_eval.evaluator`` exactly
as the CLI does. Per point we keep lmms-eval's own per-sample scores and our per-sample records, so
the exit-threshold sweep is computed from one no-exit run (it logs both answers and the exit score)
and then checked against a real run at one threshold.

``python -m lmms_sgl.proving.study`` writes ``reports/proving_ground.md``, its PNG plots and a JSON
with every number; finished points are cached under ``--work-dir`` so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loguru import logger

from lmms_sgl.method.cost import PAPER_PRESETS, prune_layer_index, token_ratio
from lmms_sgl.method.registry import methods_where
from lmms_sgl.proving.as_sweep import write_sweep_report
from lmms_sgl.proving.grids import BASELINES_2025, PRUNING_METHODS, TARGET_RATIOS
from lmms_sgl.proving.grids import study_points as points
from lmms_sgl.proving.points import (
    FAMILIES,
    TASK,
    WIDE_RATIOS,
    WIDE_TASK,
    Point,
    guide_exact_match,
    run_point,
    schedule,
    summarize,
    text_layers,
)
from lmms_sgl.reporting.paired import paired_gap

# How a point chooses K and the keep ratio for its target ratio:
#   "K=1"     one schedule shared by every method: K = 1, keep ratio solved for the target;
#   "K=0"     SGL pruning before the first layer (only a guide can rank there);
#   "preset"  the paper's own (prune_layer, keep_ratio) presets, K = int(L x prune_layer), for every
#             method that can rank at that K (FastV needs K >= 1).
SCHEDULES = ("K=1", "K=0", "preset")
# The curves of each plot panel: the shared schedule (with SGL from layer 0), then the presets.
PANELS = {
    "shared schedule (K = 1)": (*PRUNING_METHODS, "sgl K=0", *BASELINES_2025),
    "paper presets (K = int(L x prune_layer))": tuple(
        f"{m} preset" for m in (*PRUNING_METHODS, *BASELINES_2025)
    ),
}
EXIT_SWEEP_RATIO = 0.35
NEVER = 1.0 + 1e-9  # an exit threshold no score reaches (scores lie in [0, 1])
# The paper (InternVL2-26B guided by 2B, mean over its benchmarks) for comparison.
PAPER_RETAINED = {("sgl", 0.09): 0.8958, ("fastv", 0.09): 0.4699}


def baseline_points(
    family: str, num_layers: int, ratio: float, prune_layer: float, keep: float, schedule_name: str
) -> list[Point]:
    """DivPrune and VisionZip at K = 0 keeping the layer-averaged ratio that (prune_layer, keep)
    gives, PDrop at (prune_layer, keep) where K >= 1 (it ranks at layer K-1)."""
    layer_k = prune_layer_index(num_layers, prune_layer)
    before = token_ratio(layer_k, num_layers, keep)
    out = [
        Point(family, m, 0.0, before, target_ratio=ratio, schedule=schedule_name)
        for m in methods_where(lambda m: m.zero_by_default)
    ]
    if layer_k >= 1:
        out.append(Point(family, "pdrop", prune_layer, keep, target_ratio=ratio, schedule=schedule_name))
    return out


def series(summary: dict) -> str:
    """The curve a point belongs to: its method, with its schedule when it is not the shared K = 1."""
    if summary["prune_layer"] is None or summary.get("schedule", "K=1") == "K=1":
        return summary["method"]
    return f"{summary['method']} {summary['schedule']}"


def exit_sweep(no_exit: dict, thresholds: list[float]) -> list[dict]:
    """Accuracy, large-model call rate and FLOPs ratio for each threshold, from one no-exit SGL run,
    replayed by the calibration tool's code (``lmms_sgl.calibration.replay``: the pipeline's exit
    rule; an exiting sample answers with the guide's answer at the guide's cost only). A threshold
    above 1 means no exit."""
    from lmms_eval.api.metrics import mean

    from lmms_sgl.calibration.replay import from_record, sweep

    rows = no_exit["rows"]
    samples = [
        from_record(index, row, guide_right, row["exact_match"])
        for index, (row, guide_right) in enumerate(zip(rows, guide_exact_match(rows), strict=True))
    ]
    points = sweep(samples, [None if t > 1 else t for t in thresholds], mean)
    return [
        {
            "threshold": threshold,
            "accuracy": point.accuracy,
            "large_call_rate": point.large_call_rate,
            "flops_ratio": point.flops_ratio,
        }
        for threshold, point in zip(thresholds, points, strict=True)
    ]


def plot_accuracy_vs_ratio(summaries: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against the layer-averaged visual-token ratio; references as horizontal lines."""
    _plot_accuracy(summaries, path, "token_ratio", "layer-averaged visual-token ratio (%)")


def plot_accuracy_vs_flops(summaries: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against pipeline FLOPs; the guide alone is a point here (it has a cost)."""
    _plot_accuracy(summaries, path, "flops_ratio", "pipeline FLOPs (% of the large model alone)")


def _style(series_name: str) -> tuple[str, str]:
    """Colour and marker of a curve: one per method, the same in every panel and plot."""
    methods = list(next(iter(PANELS.values())))  # the first panel holds every method once
    index = methods.index(series_name.removesuffix(" preset"))
    return f"C{index}", "osv^DPX*"[index % 8]


def _plot_accuracy(summaries: dict[str, list[dict]], path: Path, x: str, xlabel: str) -> None:
    """One row per family, one panel per schedule (:data:`PANELS`), every series against ``x``; the
    large model alone as a line, the guide alone as a line or, on the FLOPs axis, a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(summaries), len(PANELS), figsize=(5.5 * len(PANELS), 4.2 * len(summaries)), squeeze=False
    )
    for row_axes, (family, rows) in zip(axes, summaries.items(), strict=True):
        large = next(r for r in rows if r["method"] == "large_only")
        guide = next(r for r in rows if r["method"] == "guide_only")
        for ax, (panel, names) in zip(row_axes, PANELS.items(), strict=True):
            for name in names:
                curve = sorted((r for r in rows if r["series"] == name), key=lambda r: r[x])
                color, marker = _style(name)
                ax.errorbar(
                    [100 * r[x] for r in curve],
                    [100 * r["accuracy"] for r in curve],
                    yerr=[100 * r["stderr"] for r in curve],
                    color=color,
                    marker=marker,
                    linestyle=":" if "K=0" in name else "-",
                    capsize=3,
                    label=name,
                )
            ax.axhline(100 * large["accuracy"], color="grey", linestyle="-", label="large_only")
            if x == "flops_ratio":
                ax.plot([100 * guide[x]], [100 * guide["accuracy"]], "k*", label="guide_only")
            else:
                ax.axhline(100 * guide["accuracy"], color="grey", linestyle="--", label="guide_only")
            ax.set(
                title=f"{family}: {panel}", xlabel=xlabel, ylabel=f"exact match on {TASK} (%)", ylim=(0, 100)
            )
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_exit_sweep(sweeps: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for family, sweep in sweeps.items():
        axes[0].plot(
            [100 * s["large_call_rate"] for s in sweep],
            [100 * s["accuracy"] for s in sweep],
            ".-",
            label=family,
        )
        axes[1].plot(
            [100 * s["flops_ratio"] for s in sweep], [100 * s["accuracy"] for s in sweep], ".-", label=family
        )
    axes[0].set(
        xlabel="large-model call rate (%)", ylabel="exact match (%)", title="accuracy vs large-model calls"
    )
    axes[1].set(
        xlabel="FLOPs, % of the large model alone", ylabel="exact match (%)", title="accuracy vs FLOPs"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retained(row: dict, large: dict) -> float | None:
    """Accuracy as a fraction of the unpruned large model's (the paper's "retained" score)."""
    return row["accuracy"] / large["accuracy"] if large["accuracy"] else None


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _gap(a: dict, b: dict) -> tuple[float, float]:
    """Accuracy difference a - b over the same samples and its paired standard error."""
    gap, err, _ = paired_gap(a["scores"], b["scores"])
    return gap, err


def _verdict(gap: float, err: float) -> str:
    return "better" if gap > 2 * err else "worse" if gap < -2 * err else "within two standard errors"


def comparison(by: dict, schedule_name: str, other: str) -> str:
    """SGL against ``other`` on one schedule at every ratio both ran, as accuracy points ± paired
    standard error, bucketed by whether the gap exceeds two standard errors."""
    suffix = "" if schedule_name == "K=1" else f" {schedule_name}"
    buckets: dict[str, list[str]] = {"better": [], "within two standard errors": [], "worse": []}
    missing = []
    ratios = TARGET_RATIOS if schedule_name == "K=1" else tuple(PAPER_PRESETS)
    for ratio in ratios:
        ours, theirs = by.get((f"sgl{suffix}", ratio)), by.get((f"{other}{suffix}", ratio))
        if ours is None or theirs is None:
            missing.append(f"{_pct(ratio, 0)} %")
            continue
        gap, err = _gap(ours, theirs)
        buckets[_verdict(gap, err)].append(f"{_pct(ratio, 0)} % ({100 * gap:+.1f} ± {100 * err:.1f})")
    said = "; ".join(f"{verdict} at {', '.join(at)}" for verdict, at in buckets.items() if at)
    if missing:
        said += f"; not run at {', '.join(missing)} (K = 0: {other} cannot rank before the first layer)"
    return said


def findings(summaries: dict[str, list[dict]], sweeps: dict[str, list[dict]]) -> list[str]:
    """Plain statements, computed from the runs, next to the paper's claims."""
    lines = ["## What holds and what does not", ""]
    for family, rows in summaries.items():
        by = {(r["series"], r["target_ratio"]): r for r in rows}
        large, guide = by[("large_only", None)], by[("guide_only", None)]
        low = min(TARGET_RATIOS)
        from_zero = by[("sgl K=0", low)]
        kept = {m: _pct(retained(by[(m, low)], large)) for m in PRUNING_METHODS}
        preset = {m: by.get((f"{m} preset", low)) for m in PRUNING_METHODS}
        paper = {m: _pct(PAPER_RETAINED[(m, low)]) for m in ("sgl", "fastv")}
        lines.append(
            f"- **{family}**, at {_pct(low, 0)} % of visual tokens: SGL keeps {kept['sgl']} % of the "
            f"large model's accuracy (paper: {paper['sgl']} %), FastV {kept['fastv']} % "
            f"(paper: {paper['fastv']} %), random {kept['random']} % on the shared K = 1 schedule. "
            f"At the paper's 9 % preset (K = {_layer_k(preset['sgl'])}) SGL keeps "
            f"{_pct(retained(preset['sgl'], large))} %, random {_pct(retained(preset['random'], large))} %. "
            f"The guide alone scores {_pct(retained(guide, large))} % at "
            f"{_pct(guide['flops_ratio'])} % of the large model's FLOPs. With pruning from layer 0 (keep "
            f"{_pct(from_zero['keep_ratio'])} %), SGL keeps {_pct(retained(from_zero, large))} %."
        )
        for schedule_name, label in (("K=1", "shared K = 1 schedule"), ("preset", "paper presets")):
            for other in ("fastv", "random", *BASELINES_2025):
                lines.append(
                    f"  - {label}, SGL vs {other} (accuracy points ± standard error): "
                    f"{comparison(by, schedule_name, other)}."
                )
        sweep = sweeps.get(family)
        if sweep:
            no_exit = sweep[-1]
            cheap = [s for s in sweep if s["accuracy"] >= no_exit["accuracy"] - 0.01]
            best = min(cheap, key=lambda s: s["large_call_rate"])
            lines.append(
                f"  - Early exit at {_pct(EXIT_SWEEP_RATIO, 0)} %: with threshold {best['threshold']:.4g} "
                f"the large model runs on {_pct(best['large_call_rate'])} % of samples at "
                f"{_pct(best['flops_ratio'])} % of its FLOPs, accuracy {_pct(best['accuracy'])} % "
                f"(no exit: {_pct(no_exit['accuracy'])} %, {_pct(no_exit['flops_ratio'])} % of FLOPs)."
            )
    lines.append("")
    return lines


def _layer_k(summary: dict | None, missing: str = "n/a") -> str:
    """The pruning layer K of a run, as text (``missing`` for references and runs not made)."""
    if summary is None or summary["prune_layer"] is None:
        return missing
    return str(prune_layer_index(summary["num_layers"], summary["prune_layer"]))


def results_table(rows: list[dict], schedules: tuple[str, ...] = SCHEDULES) -> list[str]:
    """Markdown rows of one family's points on ``schedules``, highest token ratio first, references
    (the large model alone, the guide alone) last."""
    large = next(r for r in rows if r["method"] == "large_only")
    rows = [r for r in rows if r["prune_layer"] is None or r.get("schedule", "K=1") in schedules]
    lines = [
        "| method | target ratio | measured ratio | K | keep | accuracy % | ± | retained % of large | "
        "FLOPs % of large | color | shape | count | exists |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(rows, key=lambda r: (r["target_ratio"] is None, -(r["target_ratio"] or 0), r["series"]))
    for r in ordered:
        k = _layer_k(r, missing="")
        keep = "" if r["keep_ratio"] is None else f"{r['keep_ratio']:.3f}"
        lines.append(
            f"| {r['series']} | {_pct(r['target_ratio'], 0) if r['target_ratio'] else ''} | "
            f"{_pct(r['token_ratio'])} | {k} | {keep} | {_pct(r['accuracy'])} | {_pct(r['stderr'])} | "
            f"{_pct(retained(r, large))} | {_pct(r['flops_ratio'])} | "
            + " | ".join(_pct(r["by_type"].get(t)) for t in ("color", "shape", "count", "exists"))
            + " |"
        )
    return lines


def write_report(out_dir: Path, data: dict, command: str) -> Path:
    """``proving_ground.md``: tables per family, the paper comparison, the exit sweep and its check."""
    summaries, sweeps, checks = data["summaries"], data["sweeps"], data["checks"]
    lines = [
        "# Proving ground: SGL on trained small VLMs (sgl_shapes)",
        "",
        f"Reproduce: `{command}`. Every point is an lmms-eval run of `sgl_internvl2` / `sgl_llava` on",
        f"the `{TASK}` test task with the bundled `models/shapes-*` pairs; all numbers come from those runs.",
        "`sgl`, `fastv` and `random` share one schedule per ratio: K = 1 (the earliest layer at which FastV",
        "can rank: it reads layer K-1's attention), keep ratio chosen to reach the layer-averaged target;",
        "they differ only in which tokens they keep. `sgl K=0` prunes before the first layer, which only a",
        "guide makes possible (at 9 % it keeps 9 % of the tokens instead of 0.7 %). `preset` points use the",
        "paper's own settings for 64 / 35 / 9 % as a user would pass them (their measured ratio differs",
        "from the label where int(L x prune_layer) rounds K down). The 2025 baselines run beside them:",
        "`divprune` and `visionzip` prune before the language model (K = 0) keeping the schedule's",
        "layer-averaged ratio, `pdrop` drops three times from the schedule's K (so never at K = 0).",
        '"±" in the tables is the binomial standard error of the accuracy; differences between methods',
        "are paired over the same questions (``sd(d_i) / sqrt(n)``).",
        "",
    ]
    for family, rows in summaries.items():
        large = next(r for r in rows if r["method"] == "large_only")
        guide = next(r for r in rows if r["method"] == "guide_only")
        lines += [
            f"## {family} ({large['num_layers']}-layer large model)",
            "",
            f"References: large_only {_pct(large['accuracy'])} %, guide_only {_pct(guide['accuracy'])} % "
            f"(n = {large['n']}).",
            "",
            "Shared schedule (K = 1) and SGL from layer 0:",
            "",
            *results_table(rows, ("K=1", "K=0")),
            "",
            "The paper's presets (`prune_layer`, `keep_ratio`) = (0.4, 0.4), (0.2, 0.2), (0.05, 0.05) for",
            f"64 / 35 / 9 %: K = int({large['num_layers']} x prune_layer); FastV only where K >= 1:",
            "",
            *results_table(rows, ("preset",)),
            "",
        ]
    if data.get("wide"):
        lines += [
            f"## internvl, multi-tile: `{WIDE_TASK}` (896 x 448 px: two tiles and a thumbnail, 768 tokens)",
            "",
            "The models were trained on single 448 px tiles only.",
            "",
            *results_table(data["wide"]),
            "",
        ]
    lines += findings(summaries, sweeps)
    lines += [
        "![accuracy versus visual-token ratio](proving_ground_ratio.png)",
        "",
        "![accuracy versus pipeline FLOPs](proving_ground_flops.png)",
        "",
        f"## Early exit (SEE) on top of SGP at {_pct(EXIT_SWEEP_RATIO, 0)} %",
        "",
        "One SGL run per family without exits (`record_exit_score=true`) logs, per sample, the guide's",
        "answer, the exit score and the pruned large model's answer and cost; each threshold below replays",
        "that run (a sample exits when its score reaches the threshold and then costs the guide only;",
        "without exit the guide's consistency pass is not counted, as a run without a threshold skips it).",
        "",
        "| family | threshold | accuracy % | large-model calls % | FLOPs % of large |",
        "|---|---|---|---|---|",
    ]
    for family, sweep in sweeps.items():
        for s in sweep:
            lines.append(
                f"| {family} | {'never' if s['threshold'] > 1 else format(s['threshold'], '.4g')} | "
                f"{_pct(s['accuracy'])} | {_pct(s['large_call_rate'])} | "
                f"{_pct(s['flops_ratio'])} |"
            )
    lines += ["", "![exit threshold sweep](proving_ground_exit.png)", "", "### Check of the replay", ""]
    for family, check in checks.items():
        lines.append(
            f"- {family}: a real run with exit_threshold={check['threshold']:.4g} gave accuracy "
            f"{_pct(check['run']['accuracy'])} %, exit rate {_pct(check['run']['exit_rate'])} %, FLOPs "
            f"{_pct(check['run']['flops_ratio'])} %; the replay predicted "
            f"{_pct(check['replay']['accuracy'])} %, {_pct(1 - check['replay']['large_call_rate'])} %, "
            f"{_pct(check['replay']['flops_ratio'])} %."
        )
    from lmms_sgl.proving import resolution, unit_selection

    # keep the sections of ``python -m lmms_sgl.proving.resolution`` and ``.unit_selection``
    for saved_name, module in (
        ("proving_ground_resolution.json", resolution),
        ("proving_ground_units.json", unit_selection),
    ):
        if (out_dir / saved_name).exists():
            saved = json.loads((out_dir / saved_name).read_text())
            lines += ["", *module.section(saved, saved["command"])]
    path = out_dir / "proving_ground.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_study(
    root: Path, out_dir: Path, work_dir: Path, limit: int | None, batch_size: int, families
) -> dict:
    summaries: dict[str, list[dict]] = {}
    sweeps: dict[str, list[dict]] = {}
    checks: dict[str, dict] = {}
    for family in families:
        num_layers = _num_layers(root / FAMILIES[family][1])
        rows = []
        for point in points(family, num_layers):
            summary = summarize(run_point(point, root, work_dir, limit, batch_size))
            summary["num_layers"] = num_layers
            rows.append({**summary, "series": series(summary)})
        summaries[family] = rows
        prune_layer, keep = schedule(EXIT_SWEEP_RATIO, num_layers)
        no_exit = run_point(  # with exit scores (and their consistency pass) for the replay
            Point(family, "sgl", prune_layer, keep, target_ratio=EXIT_SWEEP_RATIO),
            root,
            work_dir,
            limit,
            batch_size,
        )
        scores = sorted(r["exit_score"] for r in no_exit["rows"])
        deciles = [scores[min(len(scores) - 1, int(q / 10 * len(scores)))] for q in range(1, 10)]
        thresholds = sorted({0.0, *deciles, NEVER})
        sweeps[family] = exit_sweep(no_exit, thresholds)
        middle = deciles[4]
        checked = Point(
            family, "sgl", prune_layer, keep, exit_threshold=middle, target_ratio=EXIT_SWEEP_RATIO
        )
        checks[family] = {
            "threshold": middle,
            "run": summarize(run_point(checked, root, work_dir, limit, batch_size)),
            "replay": exit_sweep(no_exit, [middle])[0],
        }
    wide = []
    if "internvl" in families:
        num_layers = _num_layers(root / FAMILIES["internvl"][1])
        wide_points = [Point("internvl", m, task=WIDE_TASK) for m in ("large_only", "guide_only")]
        for ratio in WIDE_RATIOS:
            prune_layer, keep = schedule(ratio, num_layers)
            wide_points += [
                Point("internvl", m, prune_layer, keep, target_ratio=ratio, task=WIDE_TASK)
                for m in PRUNING_METHODS
            ]
            from_zero = schedule(ratio, num_layers, layer_k=0)
            wide_points.append(
                Point("internvl", "sgl", *from_zero, target_ratio=ratio, task=WIDE_TASK, schedule="K=0")
            )
        for point in wide_points:
            summary = {
                **summarize(run_point(point, root, work_dir, limit, batch_size)),
                "num_layers": num_layers,
            }
            wide.append({**summary, "series": series(summary)})
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_ratio(summaries, out_dir / "proving_ground_ratio.png")
    plot_accuracy_vs_flops(summaries, out_dir / "proving_ground_flops.png")
    plot_exit_sweep(sweeps, out_dir / "proving_ground_exit.png")
    for family, rows in summaries.items():  # the same points through lmms-sgl-sweep's report
        write_sweep_report(family, rows, root, out_dir)
    data = {"summaries": summaries, "sweeps": sweeps, "checks": checks, "wide": wide}
    (out_dir / "proving_ground.json").write_text(json.dumps(data, indent=1))
    return data


def _num_layers(path: Path) -> int:
    return text_layers(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (models/, tasks/)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where the report and plots go")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/study"), help="cached finished points")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test samples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args(argv)
    command = "python -m lmms_sgl.proving.study" + (f" --limit {args.limit}" if args.limit else "")
    data = run_study(args.root.resolve(), args.out, args.work_dir, args.limit, args.batch_size, args.families)
    path = write_report(args.out, data, command)
    logger.info(f"wrote {path}")


if __name__ == "__main__":
    main()
