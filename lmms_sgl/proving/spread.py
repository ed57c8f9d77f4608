"""Does spreading the guide's importance over the image pay? ``selection=spread`` on the proving ground.

1. **Validation** (``sgl_shapes_val``, scenes the test split never sees): SGL's ``topk`` against
   ``spread`` at radius 1 and 2, at 35 % and 9 % of the visual tokens, pruning from layer 0 and on the
   shared K = 1 schedule, both pairs. The radius with the best mean accuracy over these cells is chosen
   here, before any test number is looked at.
2. **Test** (``sgl_shapes``, 300 questions): the chosen rule at every ratio of both schedules and at
   the paper's presets, beside SGL ``topk`` and the 2025 baselines (DivPrune, VisionZip, PDrop), with
   paired differences over the same questions, and the issue's goal lines at 9 %.

Every point is an ordinary lmms-eval run (:func:`lmms_sgl.proving.points.run_point`), cached with
``make study``'s points, so the baselines come from its cache. Writes ``reports/spread.md`` and
``reports/spread.json``::

    python -m lmms_sgl.proving.spread
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from loguru import logger

from lmms_sgl.costs.operating_point import real_pair
from lmms_sgl.method.cost import PAPER_PRESETS, prune_layer_index
from lmms_sgl.method.registry import method_named
from lmms_sgl.method.spread import AUTO_SPREAD_MAX_KEEP, resolve_selection
from lmms_sgl.proving.frontier import CostedRow, budget_goal, costed, exit_rows, mark_frontiers
from lmms_sgl.proving.points import FAMILIES, TASK, Point, run_point, schedule, summarize
from lmms_sgl.proving.study import TARGET_RATIOS, _num_layers, baseline_points
from lmms_sgl.reporting.paired import paired_gap

VALIDATION_TASK = "sgl_shapes_val"
VALIDATION_RATIOS = (0.35, 0.2, 0.09)
RADIUS_RATIOS = (0.35, 0.09)  # the cells the radius was chosen on (the 20 % ones came later, for auto)
RADII = (1, 2)
SCHEDULE_K = {"K=0": 0, "K=1": 1}
# Exit thresholds for the frontiers: these quantiles of the guide's exit scores on the validation
# split (so about half, 30 % and 10 % of the questions exit), replayed on every guided test point.
EXIT_QUANTILES = (0.5, 0.7, 0.9)
# DivPrune moved to SGL's K = 1 schedule (hidden states entering layer 1) at the middle budgets, where
# the schedule keeps enough tokens to compare rules (at 9 % it keeps 1 of 256).
DIVPRUNE_AT_K_RATIOS = (0.35, 0.2)


def sgl_point(family: str, num_layers: int, ratio: float, name: str, radius: int | None, task: str) -> Point:
    """SGL at ``ratio`` on schedule ``name`` (``K=0``, ``K=1`` or ``preset``), top-k or spread."""
    if name == "preset":
        prune_layer, keep = PAPER_PRESETS[ratio]
    else:
        prune_layer, keep = schedule(ratio, num_layers, layer_k=SCHEDULE_K[name])
    rule = {} if radius is None else {"selection": "spread", "spread_radius": radius}
    return Point(family, "sgl", prune_layer, keep, target_ratio=ratio, schedule=name, task=task, **rule)


def measured(point: Point, layers: int, root: Path, work_dir: Path, batch_size: int) -> dict:
    """The point's summary (run or cached), with its layer K."""
    summary = summarize(run_point(point, root, work_dir, None, batch_size))
    prune_layer = summary["prune_layer"]
    summary["layer_k"] = "" if prune_layer is None else prune_layer_index(layers, prune_layer)
    return summary


def label(summary: dict) -> str:
    """``sgl topk``, ``sgl spread r=2``, a baseline's name, or ``divprune at K`` for DivPrune moved to
    the schedule's layer K (the project's extension)."""
    method = summary["method"]
    if method == "sgl":
        rule = summary.get("selection", "topk")
        return f"sgl {rule}" if rule != "spread" else f"sgl spread r={summary['spread_radius']}"
    if method_named(method).zero_by_default and summary.get("prune_layer"):
        return f"{method} at K"
    return method


def radius_means(rows: list[dict], ratios: tuple[float, ...]) -> dict[int, float]:
    """Mean validation accuracy of each radius over the cells at ``ratios``."""
    out = {}
    for radius in RADII:
        values = [
            r["accuracy"] for r in rows if r.get("spread_radius") == radius and r["target_ratio"] in ratios
        ]
        out[radius] = sum(values) / max(1, len(values))
    return out


def validation(root: Path, work_dir: Path, batch_size: int, families: list[str]) -> tuple[int, list[dict]]:
    """The validation cells and the chosen radius (best mean accuracy over the cells at
    :data:`RADIUS_RATIOS`, the ones the radius was first chosen on, before any test run)."""
    rows = []
    for family in families:
        layers = _num_layers(root / FAMILIES[family][1])
        for ratio in VALIDATION_RATIOS:
            for name in SCHEDULE_K:
                for radius in (None, *RADII):
                    point = sgl_point(family, layers, ratio, name, radius, VALIDATION_TASK)
                    rows.append(measured(point, layers, root, work_dir, batch_size))
    means = radius_means(rows, RADIUS_RATIOS)
    chosen = max(RADII, key=lambda radius: (means[radius], -radius))
    logger.info(f"validation: mean accuracy by radius {means}; chosen radius {chosen}")
    return chosen, rows


# Candidate rules for ``selection=auto``: spread or not, from the layer K and the keep ratio.
AUTO_CANDIDATES = {
    "always top-k (the paper)": lambda layer_k, keep: False,
    "always spread": lambda layer_k, keep: True,
    f"spread at keep ratios <= {AUTO_SPREAD_MAX_KEEP}": lambda layer_k, keep: keep <= AUTO_SPREAD_MAX_KEEP,
    "spread from layer 0": lambda layer_k, keep: layer_k == 0,
    f"shipped: spread from layer 0 or at keep ratios <= {AUTO_SPREAD_MAX_KEEP}": lambda layer_k, keep: (
        resolve_selection("auto", keep, layer_k) == "spread"
    ),
}


def auto_scores(validation_rows: list[dict], radius: int) -> dict[str, float]:
    """Mean validation accuracy of each candidate ``auto`` rule: per cell (family, ratio, schedule)
    the spread run at ``radius`` where the rule spreads, the top-k run elsewhere."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in validation_rows:
        rule = label(r)
        if rule in ("sgl topk", f"sgl spread r={radius}"):
            cells.setdefault((r["family"], r["target_ratio"], r["schedule"]), {})[rule] = r
    out = {}
    for name, spreads in AUTO_CANDIDATES.items():
        chosen = []
        for pair in cells.values():
            topk = pair["sgl topk"]
            spread = spreads(int(topk["layer_k"]), float(topk["keep_ratio"]))
            chosen.append(pair[f"sgl spread r={radius}" if spread else "sgl topk"]["accuracy"])
        out[name] = sum(chosen) / max(1, len(chosen))
    return out


def radius_text(chosen_on: dict, everywhere: dict, topk: list[float], radius: int) -> str:
    """How the radius was chosen, and the means over every cell."""
    cells = ", ".join(f"{100 * r:.0f} %" for r in RADIUS_RATIOS)
    return (
        f"Radius, chosen before any test run on the cells at {cells}: "
        + ", ".join(f"r={r} {100 * m:.2f} %" for r, m in chosen_on.items())
        + f" (top-k {100 * sum(topk) / max(1, len(topk)):.2f} % over every cell): radius {radius}. "
        "Over every cell, the 20 % ones added later for `selection=auto` included: "
        + ", ".join(f"r={r} {100 * m:.2f} %" for r, m in everywhere.items())
        + " (level within half a point; the test grid ran at the radius chosen first)."
    )


def auto_lines(validation_rows: list[dict], radius: int) -> list[str]:
    """The validation's case for ``selection=auto``: each candidate rule's mean accuracy, and whether
    the shipped rule is the best."""
    scores = auto_scores(validation_rows, radius)
    best = max(scores.values())
    shipped = next(name for name in scores if name.startswith("shipped"))
    lines = [f"`selection=auto`, candidate rules on the validation cells (spread at radius {radius}):", ""]
    lines += [f"- {name}: {100 * value:.2f} %" for name, value in scores.items()]
    verdict = "**the best**" if scores[shipped] >= best else "**not the best**: change `resolve_selection`"
    return [*lines, "", f"The shipped rule (the default, `lmms_sgl/method/spread.py`) is {verdict}."]


def test_points(family: str, layers: int, radius: int) -> list[Point]:
    """The chosen rule, SGL top-k and the 2025 baselines at every ratio and schedule of the study."""
    out = [Point(family, "large_only")]
    for ratio in TARGET_RATIOS:
        for name in SCHEDULE_K:
            out += [sgl_point(family, layers, ratio, name, r, TASK) for r in (None, radius)]
        prune_layer, keep = schedule(ratio, layers)
        out += baseline_points(family, layers, ratio, prune_layer, keep, "K=1")
        if ratio in DIVPRUNE_AT_K_RATIOS:  # DivPrune on SGL's schedule: the rule, not the layer
            out.append(Point(family, "divprune", prune_layer, keep, target_ratio=ratio, schedule="K=1"))
    for ratio in sorted(PAPER_PRESETS, reverse=True):
        out += [sgl_point(family, layers, ratio, "preset", r, TASK) for r in (None, radius)]
        prune_layer, keep = PAPER_PRESETS[ratio]
        out += baseline_points(family, layers, ratio, prune_layer, keep, "preset")
    return out


def gap_text(a: dict, b: dict) -> str:
    gap, err, _ = paired_gap(a["scores"], b["scores"])
    return f"{100 * gap:+.1f} ± {100 * err:.1f}"


def verdict(a: dict, b: dict) -> str:
    gap, err, _ = paired_gap(a["scores"], b["scores"])
    if gap > 2 * err:
        return "better"
    if gap < -2 * err:
        return "worse"
    return "within two s.e."


def test_tables(rows: list[dict], radius: int) -> list[str]:
    """Per ratio and schedule: every method's accuracy and FLOPs, and the spread rule's paired
    differences to SGL top-k and to each baseline at the same ratio (baselines: their K = 1 or
    preset run; DivPrune and VisionZip prune from layer 0 in both)."""
    large = next(r for r in rows if r["method"] == "large_only")
    spread = f"sgl spread r={radius}"
    lines = [
        "| schedule | ratio % | method | K | accuracy % | ± | retained % of large | FLOPs % of large | "
        f"{spread} minus it (points ± s.e.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("K=0", "K=1", "preset"):
        ratios = TARGET_RATIOS if name != "preset" else tuple(sorted(PAPER_PRESETS, reverse=True))
        for ratio in ratios:
            cell = [r for r in rows if r.get("target_ratio") == ratio and r.get("schedule") == name]
            if name == "K=0":  # the baselines are listed once, with their shared schedule
                cell = [r for r in cell if r["method"] == "sgl"]
            ours = next((r for r in cell if label(r) == spread), None)
            for r in sorted(cell, key=lambda r: (label(r) != spread, label(r))):
                paired = "" if ours is None or r is ours else gap_text(ours, r)
                lines.append(
                    f"| {name} | {100 * ratio:.0f} | {label(r)} | {r['layer_k']} | "
                    f"{100 * r['accuracy']:.1f} | "
                    f"{100 * r['stderr']:.1f} | {100 * r['accuracy'] / large['accuracy']:.1f} | "
                    f"{100 * r['flops_ratio']:.1f} | {paired} |"
                )
    return lines


def goal_lines(rows: list[dict], radius: int) -> list[str]:
    """The issue's goal at 9 %: the spread rule beats DivPrune by two paired standard errors and keeps
    at least 90 % of the large model's accuracy (its best schedule at 9 %)."""
    large = next(r for r in rows if r["method"] == "large_only")
    spread = f"sgl spread r={radius}"
    nine = [r for r in rows if r.get("target_ratio") == 0.09 and r.get("schedule") in ("K=0", "K=1")]
    ours = max((r for r in nine if label(r) == spread), key=lambda r: r["accuracy"])
    divprune = next(r for r in nine if label(r) == "divprune")  # its authors' setting: K = 0
    gap, err, _ = paired_gap(ours["scores"], divprune["scores"])
    kept = ours["accuracy"] / large["accuracy"]
    return [
        f"- 9 %, best schedule ({ours['schedule']}): {spread} {100 * ours['accuracy']:.1f} % against "
        "DivPrune "
        f"{100 * divprune['accuracy']:.1f} %: {100 * gap:+.1f} ± {100 * err:.1f} points; beats it by two "
        f"standard errors: **{'met' if gap > 2 * err else 'not met'}**.",
        f"- 9 %: keeps {100 * kept:.1f} % of the large model's accuracy ({100 * large['accuracy']:.1f} %); "
        f">= 90 %: **{'met' if kept >= 0.9 else 'not met'}**.",
    ]


def exit_thresholds(family: str, layers: int, radius: int, root: Path, work_dir: Path, batch_size: int):
    """:data:`EXIT_QUANTILES` of the guide's exit scores on the validation split (the guide's score
    does not depend on the large model's pruning, so any guided validation run gives the same)."""
    point = sgl_point(family, layers, VALIDATION_RATIOS[0], "K=0", radius, VALIDATION_TASK)
    scores = sorted(r["exit_score"] for r in run_point(point, root, work_dir, None, batch_size)["rows"])
    return [scores[min(len(scores) - 1, int(q * len(scores)))] for q in EXIT_QUANTILES]


def row_label(summary: dict) -> str:
    if summary.get("prune_layer") is None:
        return summary["method"]
    return f"{label(summary)} {summary['schedule']} {100 * summary['target_ratio']:.0f} %"


def frontier_rows(
    family: str, rows: list[dict], radius: int, root: Path, work_dir: Path, batch_size: int
) -> list[CostedRow]:
    """Every test point, the guide alone, and each guided point at the validation's exit thresholds,
    costed at the proving pair and priced at the family's real pair; frontiers marked."""
    pair = real_pair(family)
    layers = _num_layers(root / FAMILIES[family][1])
    guide = measured(Point(family, "guide_only"), layers, root, work_dir, batch_size)
    thresholds = exit_thresholds(family, layers, radius, root, work_dir, batch_size)
    out = [costed(summary, row_label(summary), pair) for summary in [*rows, guide]]
    for summary in rows:
        if summary["method"] == "sgl":
            point = Point(**{k: summary[k] for k in Point.__dataclass_fields__ if k in summary})
            payload = run_point(point, root, work_dir, None, batch_size)
            out += exit_rows(summary, payload, thresholds, row_label(summary), pair)
    mark_frontiers(out)
    return out


def frontier_lines(family: str, rows: list[CostedRow]) -> list[str]:
    """The two frontiers' points, and the goal on the real-pair frontier, per budget."""
    pair = real_pair(family)
    lines = [
        f"### {family}: two frontiers",
        "",
        f"Priced at **{pair.label}** ({pair.large.layout.visual_tokens} visual tokens, "
        f"{pair.work.prompt_tokens} prompt text tokens, {pair.work.answer_tokens} answer tokens; the guide "
        f"alone costs {100 * next(r.real for r in rows if r.label == 'guide_only'):.1f} % of the large "
        f"model there, against {100 * next(r.proving for r in rows if r.label == 'guide_only'):.1f} % on the "
        "proving pair). Points on either frontier, cheapest first:",
        "",
        "| point | accuracy % | ± | exit % | FLOPs % of large, proving pair | on its frontier | "
        "FLOPs % of large, real pair | on its frontier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted((r for r in rows if r.on_proving or r.on_real), key=lambda r: r.real):
        lines.append(
            f"| {row.label} | {100 * row.accuracy:.1f} | {100 * row.stderr:.1f} | "
            f"{100 * row.exit_rate:.0f} | "
            f"{100 * row.proving:.1f} | {'yes' if row.on_proving else ''} | {100 * row.real:.1f} | "
            f"{'yes' if row.on_real else ''} |"
        )
    lines += [
        "",
        "Goal (issue 35): at every budget a guide-using point (selection and/or exit) is on the real-pair "
        "frontier or within one paired standard error of it (the closest guided point per budget):",
        "",
        *budget_goal(rows, "real"),
        "",
        "The same on the proving pair's own FLOPs:",
        "",
        *budget_goal(rows, "proving"),
        "",
    ]
    return lines


def auto_row(cell: list[dict], radius: int) -> dict | None:
    """The SGL run ``selection=auto`` makes in this cell: the spread one where it spreads."""
    topk = next((r for r in cell if label(r) == "sgl topk"), None)
    if topk is None:
        return None
    rule = resolve_selection("auto", float(topk["keep_ratio"]), int(topk["layer_k"]))
    return topk if rule == "topk" else next((r for r in cell if label(r) == f"sgl spread r={radius}"), None)


def best_rule_lines(rows: list[dict], radius: int) -> list[str]:
    """Goal: one guided rule (the default, ``selection=auto``) is the best method, or within one
    paired standard error of the best, in every cell (budget and schedule) where the baselines ran."""
    lines = []
    for name in ("K=1", "preset"):
        ratios = TARGET_RATIOS if name != "preset" else tuple(sorted(PAPER_PRESETS, reverse=True))
        for ratio in ratios:
            cell = [r for r in rows if r.get("target_ratio") == ratio and r.get("schedule") == name]
            ours = auto_row(cell, radius)
            if ours is None:
                continue
            best = max(cell, key=lambda r: r["accuracy"])
            head = f"- {name} {100 * ratio:.0f} %: auto = {label(ours)} {100 * ours['accuracy']:.1f} %"
            if best["accuracy"] <= ours["accuracy"]:
                lines.append(f"{head}, the best: **met**.")
                continue
            gap, err, _ = paired_gap(best["scores"], ours["scores"])
            within = gap <= err
            lines.append(
                f"{head}; best {label(best)} {100 * best['accuracy']:.1f} %, "
                f"{100 * gap:.1f} ± {100 * err:.1f} points above: **{'met' if within else 'not met'}**."
            )
    return lines


def plot_frontiers(frontiers: dict[str, list[CostedRow]], path: Path) -> None:
    """Accuracy against FLOPs, one row per family: the proving pair's own, then priced at the real pair;
    guided points coloured, frontiers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(frontiers), 2, figsize=(12, 4.4 * len(frontiers)), squeeze=False)
    for row_axes, (family, rows) in zip(axes, frontiers.items(), strict=True):
        for ax, (cost, flag, title) in zip(
            row_axes,
            (("proving", "on_proving", "proving pair"), ("real", "on_real", real_pair(family).label)),
            strict=True,
        ):
            for guided, colour, name in ((False, "grey", "no guide"), (True, "C0", "guide-using")):
                chosen = [r for r in rows if r.guided == guided]
                ax.scatter(
                    [100 * getattr(r, cost) for r in chosen],
                    [100 * r.accuracy for r in chosen],
                    s=14,
                    color=colour,
                    label=name,
                )
            edge = sorted((r for r in rows if getattr(r, flag)), key=lambda r: getattr(r, cost))
            ax.step(
                [100 * getattr(r, cost) for r in edge],
                [100 * r.accuracy for r in edge],
                where="post",
                color="C3",
                label="frontier",
            )
            ax.set(
                title=f"{family}: {title}",
                xlabel="FLOPs (% of the large model alone)",
                ylabel=f"exact match on {TASK} (%)",
            )
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    out_dir: Path,
    radius: int,
    validation_rows: list[dict],
    tests: dict[str, list[dict]],
    frontiers: dict[str, list[CostedRow]],
    command: str,
):
    lines = [
        "# Guided spread selection on the proving ground",
        "",
        f"Reproduce: `{command}` (points cached in `.cache/study`, shared with `make study`).",
        "",
        "`selection=spread` keeps the guide's most important token, suppresses its neighbours within the",
        "radius (same image and view), and repeats; the radius shrinks while the budget is not filled, so",
        "it keeps as many tokens as top-k. Paired differences are over the same questions.",
        "",
        "## Validation (`sgl_shapes_val`): choosing the radius",
        "",
        "| family | ratio % | schedule | rule | accuracy % | ± |",
        "|---|---|---|---|---|---|",
    ]
    for r in validation_rows:
        lines.append(
            f"| {r['family']} | {100 * r['target_ratio']:.0f} | {r['schedule']} | {label(r)} | "
            f"{100 * r['accuracy']:.1f} | {100 * r['stderr']:.1f} |"
        )
    chosen_on = radius_means(validation_rows, RADIUS_RATIOS)
    everywhere = radius_means(validation_rows, VALIDATION_RATIOS)
    topk = [row["accuracy"] for row in validation_rows if row.get("selection", "topk") == "topk"]
    lines += [
        "",
        radius_text(chosen_on, everywhere, topk, radius),
        "",
        *auto_lines(validation_rows, radius),
        "",
    ]
    for family, rows in tests.items():
        lines += [f"## {family}: test split (`{TASK}`, {rows[0]['n']} questions)", ""]
        lines += test_tables(rows, radius)
        lines += ["", "Goals (issue 35) at 9 %:", "", *goal_lines(rows, radius), ""]
        lines += [
            "Goal (issue 35): one guided rule, the default `selection=auto`, is the best method or within "
            "one paired standard error of the best, in every cell:",
            "",
            *best_rule_lines(rows, radius),
            "",
        ]
        lines += frontier_lines(family, frontiers[family])
    lines += ["![accuracy against FLOPs, proving and real pairs](spread_frontiers.png)", ""]
    plot_frontiers(frontiers, out_dir / "spread_frontiers.png")
    path = out_dir / "spread.md"
    path.write_text("\n".join(lines) + "\n")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "scores"} for r in rows]  # noqa: E731
    data = {
        "command": command,
        "radius": radius,
        "validation": strip(validation_rows),
        "test": {f: strip(rows) for f, rows in tests.items()},
        "frontiers": {
            f: [{k: v for k, v in asdict(r).items() if k != "scores"} for r in rows]
            for f, rows in frontiers.items()
        },
    }
    (out_dir / "spread.json").write_text(json.dumps(data, indent=1))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/study"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--validation-only", action="store_true", help="stop after choosing the radius")
    parser.add_argument(
        "--test-radius",
        type=int,
        default=None,
        help="run the test points at this radius (e.g. the one the full validation chose, to fill the "
        "cache in a second lane); no report is written",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.test_radius is not None:
        for family in args.families:
            layers = _num_layers(root / FAMILIES[family][1])
            for point in test_points(family, layers, args.test_radius):
                measured(point, layers, root, args.work_dir, args.batch_size)
        return
    radius, validation_rows = validation(root, args.work_dir, args.batch_size, args.families)
    if args.validation_only:
        return
    tests, frontiers = {}, {}
    for family in args.families:
        layers = _num_layers(root / FAMILIES[family][1])
        points = test_points(family, layers, radius)
        tests[family] = [measured(p, layers, root, args.work_dir, args.batch_size) for p in points]
        frontiers[family] = frontier_rows(family, tests[family], radius, root, args.work_dir, args.batch_size)
    families = "" if args.families == list(FAMILIES) else f" --families {' '.join(args.families)}"
    command = f"python -m lmms_sgl.proving.spread{families}"
    path = write(args.out, radius, validation_rows, tests, frontiers, command)
    logger.info(f"wrote {path}")


if __name__ == "__main__":
    main()
