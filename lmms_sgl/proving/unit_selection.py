"""Proving ground, pay only for what is kept: accuracy against pipeline FLOPs when the guide chooses
where the large model looks.

On ``sgl_shapes_tiles`` (1344 x 448 px: InternVL tiles it into 3 tiles plus a thumbnail, 1,024
visual tokens; the objects keep the training scenes' tile scale, so a downsampled view shrinks them
3x across) every operating point is one lmms-eval run of the trained InternVL pair
(:func:`lmms_sgl.proving.points.run_point`, cached with the study's points):

* references: the large model at the full layout, the large model downsampled (``max_tiles`` 1 and
  2: the cheapest competitor at an equal budget), the guide alone at one tile and at the full layout;
* unit selection (``keep_units`` N = 1, 2 with the thumbnail, N = 1, 2, 3 with the thumbnail
  competing; 3 tiles + thumbnail would be everything): the guide ranks the units by its importance
  mass and the large model encodes and reads only the chosen ones;
* token pruning: SGL at the paper's 64 / 35 / 9 % presets (the 9 % preset prunes from layer 0, so
  tiles without a kept token are skipped), SGL from layer 0 at 35 %, FastV and random at 35 %
  (K = 1);
* early exit: replays of no-exit SGL runs (:mod:`lmms_sgl.calibration.replay`, the pipeline's own
  rule) at several thresholds: an exiting sample answers with the guide and costs the guide only.

FLOPs are the pipeline's as its records count them (guide, the large vision tower on the units it
encoded, the language models, selection work), summed over samples and divided by the large model
alone at the full layout on the same samples. Differences between points are paired over samples
(``sd(d_i) / sqrt(n)``).

``python -m lmms_sgl.proving.unit_selection`` writes ``reports/proving_ground_units.json``, its plot,
and the section of ``reports/proving_ground.md`` between the markers below.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from lmms_sgl.method.cost import PAPER_PRESETS
from lmms_sgl.proving.grids import unit_sweep_points
from lmms_sgl.proving.points import (
    TILES_TASK,
    Point,
    guide_exact_match,
    ratio_stderr,
    run_point,
    write_section,
)
from lmms_sgl.reporting.paired import paired_gap

START, END = "<!-- unit-selection:start -->", "<!-- unit-selection:end -->"
FAMILY = "internvl"
EXIT_THRESHOLDS = (0.6, 0.7, 0.8, 0.9)
# The runs replayed with early exit (labels of :func:`operating_points`).
EXIT_FROM = ("units: 1 tile + thumbnail, guide at 3 tiles + thumbnail", "SGL preset 35 %, guide at 1 tile")
REFERENCE = "large model, 3 tiles + thumbnail"
GUIDE_SEES = {1: "1 tile", None: "3 tiles + thumbnail"}  # guide_max_tiles -> what the guide sees


@dataclass(frozen=True)
class Operating:
    """One operating point: its label, its kind (what it is compared as) and its run."""

    label: str
    kind: str  # reference | downsampled | guide | units | tokens
    point: Point


def _tiles(count: int) -> str:
    return "1 tile" if count == 1 else f"{count} tiles + thumbnail"


def operating_points(num_layers: int) -> list[Operating]:
    """Every run of the study: its sweep grids (:func:`lmms_sgl.proving.grids.unit_grids`) expanded
    by the sweep's code, each point named and kept as the study's cache knows it. Unit selection
    runs with both guides (one tile, the full layout); token pruning with the one-tile guide, the
    cheaper of the two."""
    presets = {pair: ratio for ratio, pair in PAPER_PRESETS.items()}
    out = []
    for swept in unit_sweep_points(num_layers):
        layout, chosen = dict(swept.layout), dict(swept.units)
        ratio, shared = dict(swept.ratio), dict(swept.schedule)
        guide_tiles, max_tiles = layout.get("guide_max_tiles"), layout.get("max_tiles")
        at = {"task": TILES_TASK, "guide_max_tiles": guide_tiles, "max_tiles": max_tiles}
        if swept.method == "large_only":
            kind = "reference" if max_tiles is None else "downsampled"
            label = REFERENCE if max_tiles is None else f"large model downsampled to {_tiles(max_tiles)}"
            out.append(Operating(label, kind, Point(FAMILY, swept.method, **at)))
        elif swept.method == "guide_only":
            label = f"guide alone, {GUIDE_SEES[guide_tiles]}"
            out.append(Operating(label, "guide", Point(FAMILY, swept.method, **at)))
        elif chosen:
            units, view = chosen["keep_units"], chosen["keep_global_view"]
            what = (
                f"{units} tile{'s' if units > 1 else ''} + thumbnail"
                if view
                else f"best {units} of 4 (thumbnail competes)"
            )
            point = Point(FAMILY, "sgl", keep_units=units, keep_global_view=view, **at)
            out.append(Operating(f"units: {what}, guide at {GUIDE_SEES[guide_tiles]}", "units", point))
        else:
            pair = (ratio["prune_layer"], ratio["keep_ratio"])
            if shared:
                target, schedule_name = shared["budget"], f"K={shared['layer_k']}"
            else:
                target, schedule_name = presets[pair], "preset"
            point = Point(FAMILY, swept.method, *pair, target_ratio=target, schedule=schedule_name, **at)
            if swept.method != "sgl":
                name = "FastV" if swept.method == "fastv" else swept.method
                label = f"{name} at {100 * target:.0f} % (K = 1)"
            elif schedule_name == "preset":
                label = f"SGL preset {100 * target:.0f} %, guide at {GUIDE_SEES[guide_tiles]}"
            else:
                label = f"SGL from layer 0 at {100 * target:.0f} %, guide at {GUIDE_SEES[guide_tiles]}"
            out.append(Operating(label, "tokens", point))
    return out


def sample_table(payload: dict) -> dict[int, dict]:
    """Per document: whether it was right, its pipeline FLOPs and its units encoded / given."""
    return {
        r["doc_id"]: {
            "correct": r["exact_match"],
            "flops": float(r["flops"] or 0.0),
            "units": (r.get("vision_units_encoded"), r.get("vision_units")),
            "thumbnail": (r.get("extra") or {}).get("global_views_kept"),
            "fallback": bool(r.get("fallback")),
        }
        for r in payload["rows"]
    }


def exit_replays(label: str, payload: dict) -> list[tuple[str, dict[int, dict]]]:
    """The run at each of :data:`EXIT_THRESHOLDS`, replayed with the pipeline's exit rule."""
    from lmms_sgl.calibration.replay import exits_at, from_record

    rows = payload["rows"]
    guide_right = guide_exact_match(rows)
    samples = [
        from_record(r["doc_id"], r, g, r["exact_match"]) for r, g in zip(rows, guide_right, strict=True)
    ]
    out = []
    for threshold in EXIT_THRESHOLDS:
        table = sample_table(payload)
        for sample, leave in zip(samples, exits_at(samples, threshold), strict=True):
            entry = table[sample.doc_id]
            entry["exited"] = leave
            if leave:  # answered by the guide at the guide's cost; the large vision tower never ran
                entry.update(correct=sample.guide_value, flops=sample.guide_flops, thumbnail=None)
                entry["units"] = (0, entry["units"][1])
        out.append((f"{label} + exit at {threshold:g}", table))
    return out


def describe(label: str, kind: str, table: dict[int, dict], reference: dict[int, dict]) -> dict:
    """Accuracy, pipeline FLOPs as a share of the full large model, units encoded, paired gap to it."""
    docs = sorted(table)
    correct = {d: table[d]["correct"] for d in docs}
    n = len(docs)
    accuracy = sum(correct.values()) / n
    spent, alone = [table[d]["flops"] for d in docs], [reference[d]["flops"] for d in docs]
    encoded = [table[d]["units"] for d in docs if table[d]["units"][1]]
    thumbnails = [table[d]["thumbnail"] for d in docs if table[d].get("thumbnail") is not None]
    gap, gap_err, _ = paired_gap(correct, {d: reference[d]["correct"] for d in docs})
    return {
        "label": label,
        "kind": kind,
        "n": n,
        "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / n),
        "flops_ratio": sum(spent) / sum(alone),
        "flops_ratio_stderr": ratio_stderr(spent, alone),
        "units_encoded": sum(e for e, _ in encoded) / len(encoded) if encoded else None,
        "units_given": sum(g for _, g in encoded) / len(encoded) if encoded else None,
        "thumbnail_rate": sum(t > 0 for t in thumbnails) / len(thumbnails) if thumbnails else None,
        "exit_rate": sum(bool(table[d].get("exited")) for d in docs) / n,
        "fallbacks": sum(table[d]["fallback"] for d in docs),
        "gap_to_large": gap,
        "gap_to_large_stderr": gap_err,
        "scores": correct,
    }


def frontier(rows: list[dict]) -> list[str]:
    """Labels of the points no other point dominates (no more FLOPs and no less accuracy, one of
    them strictly), cheapest first."""
    out = []
    for r in sorted(rows, key=lambda r: (r["flops_ratio"], -r["accuracy"])):
        dominated = any(
            o is not r
            and o["flops_ratio"] <= r["flops_ratio"]
            and o["accuracy"] >= r["accuracy"]
            and (o["flops_ratio"] < r["flops_ratio"] or o["accuracy"] > r["accuracy"])
            for o in rows
        )
        if not dominated:
            out.append(r["label"])
    return out


def against_downsampled(rows: list[dict]) -> list[dict]:
    """Every unit-selection and token-pruning point against every downsampled large model, paired
    over samples."""
    out = []
    for units in (r for r in rows if r["kind"] in ("units", "tokens")):
        for low in (r for r in rows if r["kind"] == "downsampled"):
            gap, err, _ = paired_gap(units["scores"], low["scores"])
            out.append(
                {
                    "kind": units["kind"],
                    "point": units["label"],
                    "downsampled": low["label"],
                    "point_flops": units["flops_ratio"],
                    "downsampled_flops": low["flops_ratio"],
                    "no_more_flops": units["flops_ratio"] <= low["flops_ratio"],
                    "gap": gap,
                    "gap_stderr": err,
                    "beats": gap > 2 * err,
                }
            )
    return out


def run(root: Path, work_dir: Path, limit: int | None, batch_size: int) -> dict:
    config = json.loads((root / "models/shapes-internvl-large/config.json").read_text())
    num_layers = config["text_config"]["num_hidden_layers"]
    runs = [
        (op, run_point(op.point, root, work_dir, limit, batch_size)) for op in operating_points(num_layers)
    ]
    reference = sample_table(next(payload for op, payload in runs if op.label == REFERENCE))
    rows = [describe(op.label, op.kind, sample_table(payload), reference) for op, payload in runs]
    for op, payload in runs:
        if op.label in EXIT_FROM:
            rows += [
                describe(label, "exit", table, reference) for label, table in exit_replays(op.label, payload)
            ]
    return {
        "task": TILES_TASK,
        "limit": limit,
        "num_layers": num_layers,
        "points": {op.label: op.point.key for op, _ in runs},
        "rows": rows,
        "frontier": frontier(rows),
        "against_downsampled": against_downsampled(rows),
    }


def _pct(value: float | None, digits: int = 1) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.{digits}f}"
    )


def _units(row: dict) -> str:
    if row["units_given"] is None:
        return "-"
    return f"{row['units_encoded']:.2f} / {row['units_given']:.0f}"


def _versus(c: dict) -> str:
    return (
        f"{c['point']} ({_pct(c['point_flops'])} % FLOPs) vs {c['downsampled']} "
        f"({_pct(c['downsampled_flops'])} %): {100 * c['gap']:+.1f} ± {_pct(c['gap_stderr'])} points"
    )


def _verdict(c: dict) -> str:
    if c["beats"]:
        return "better by > 2 s.e."
    return "worse by > 2 s.e." if c["gap"] < -2 * c["gap_stderr"] else "within 2 s.e."


def goal(comparisons: list[dict]) -> str:
    """Whether a unit-selection point beats a downsampled large model at no more FLOPs by 2 s.e.,
    with the numbers either way; and what token pruning does against the same baseline."""
    units = [c for c in comparisons if c["kind"] == "units"]
    won = [c for c in units if c["no_more_flops"] and c["beats"]]
    if won:
        said = "met: " + "; ".join(_versus(c) for c in won)
    else:
        cheap = [c for c in units if c["no_more_flops"]]
        costly = [c for c in units if c["beats"] and not c["no_more_flops"]]
        said = "not met. " + (
            "The best at no more FLOPs: " + _versus(max(cheap, key=lambda c: c["gap"]))
            if cheap
            else "No unit-selection point is as cheap as a downsampled one"
        )
        if costly:
            nearest = min(costly, key=lambda c: c["point_flops"] - c["downsampled_flops"])
            said += (
                ". Better by more than 2 s.e. only at more FLOPs; the nearest in cost: "
                f"{_versus(nearest)}, "
                f"{100 * (nearest['point_flops'] - nearest['downsampled_flops']):.1f} points of FLOPs more"
            )
    tokens = [c for c in comparisons if c["kind"] == "tokens" and c["no_more_flops"] and c["beats"]]
    if tokens:
        said += ". Token pruning that does beat it at no more FLOPs: " + "; ".join(_versus(c) for c in tokens)
    return said + "."


def section(data: dict, command: str) -> list[str]:
    rows = sorted(data["rows"], key=lambda r: r["flops_ratio"])
    large = next(r for r in rows if r["label"] == REFERENCE)
    n = large["n"]
    lines = [
        START,
        f"## internvl, pay only for what is kept: unit selection on `{TILES_TASK}`",
        "",
        f"Reproduce: `{command}`. 1344 x 448 px scenes whose objects keep the training scenes' tile scale:",
        "the large model sees 3 tiles + thumbnail (4 units, 1,024 visual tokens); downsampled to one tile",
        "the objects shrink 3x across. Unit selection (`keep_units=N`) lets the guide rank the units by",
        "its importance mass; the large model encodes and reads only the chosen ones: N tiles and the",
        "thumbnail, or with `keep_global_view=false` the best N units with the thumbnail competing (how",
        "often it won is the 'thumbnail kept' column). The guide sees one tile (`guide_max_tiles=1`) or",
        "the large model's layout. FLOPs: the whole pipeline (guide, the large vision tower on the units it",
        "encoded, language models, selection), summed over samples, as a share of the large model alone at",
        "the full layout on the same samples. Exit rows replay no-exit runs with the pipeline's rule.",
        f"n = {n}{'' if data['limit'] is None else f' (first {n} test samples: --limit)'}; '±' is one",
        "standard error (binomial for accuracy; paired over samples for differences). The models were",
        "trained on single 448 px tiles only.",
        "",
        "| # | operating point | kind | accuracy % | ± | pipeline FLOPs % of large | ± | "
        "units encoded / given | thumbnail kept % | exit % | "
        "difference to the large model (points ± s.e.) | fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(rows, 1):  # numbered as in the plot
        lines.append(
            f"| {number} | {r['label']} | {r['kind']} | {_pct(r['accuracy'])} | {_pct(r['stderr'])} | "
            f"{_pct(r['flops_ratio'])} | {_pct(r['flops_ratio_stderr'], 2)} | {_units(r)} | "
            f"{'-' if r.get('thumbnail_rate') is None else _pct(r['thumbnail_rate'], 0)} | "
            f"{_pct(r['exit_rate'], 0)} | {100 * r['gap_to_large']:+.1f} ± "
            f"{_pct(r['gap_to_large_stderr'])} | {r['fallbacks']} |"
        )
    lines += [
        "",
        "Unit selection and token pruning against the downsampled large model (paired over samples):",
        "",
        "| operating point | kind | FLOPs % | downsampled | FLOPs % | difference (points ± s.e.) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in data["against_downsampled"]:
        lines.append(
            f"| {c['point']} | {c['kind']} | {_pct(c['point_flops'])} | {c['downsampled']} | "
            f"{_pct(c['downsampled_flops'])} | {100 * c['gap']:+.1f} ± {_pct(c['gap_stderr'])} | "
            f"{_verdict(c)} |"
        )
    lines += [
        "",
        "**What dominates.** No other point is both cheaper and more accurate than these (cheapest first): "
        + "; ".join(data["frontier"])
        + ".",
        "",
        "**The goal** (a unit-selection point beating the downsampled large model at equal or lower pipeline "
        "FLOPs by at least 2 standard errors): " + goal(data["against_downsampled"]),
        "",
        "Points are numbered as in the first table:",
        "",
        "![accuracy against pipeline FLOPs](proving_ground_units.png)",
        END,
    ]
    return lines


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {
        "reference": ("k", "*"),
        "downsampled": ("tab:red", "v"),
        "guide": ("tab:grey", "D"),
        "units": ("tab:blue", "o"),
        "tokens": ("tab:green", "s"),
        "exit": ("tab:purple", "."),
    }
    for kind, (color, marker) in styles.items():
        chosen = [r for r in rows if r["kind"] == kind]
        if chosen:
            ax.errorbar(
                [100 * r["flops_ratio"] for r in chosen],
                [100 * r["accuracy"] for r in chosen],
                yerr=[100 * r["stderr"] for r in chosen],
                color=color,
                marker=marker,
                linestyle="",
                capsize=2,
                label=kind,
            )
    for number, r in enumerate(sorted(rows, key=lambda r: r["flops_ratio"]), 1):  # the table's "#"
        ax.annotate(
            str(number),
            (100 * r["flops_ratio"], 100 * r["accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    by_label = {r["label"]: r for r in rows}
    edge = [by_label[label] for label in data["frontier"]]
    ax.step(
        [100 * r["flops_ratio"] for r in edge],
        [100 * r["accuracy"] for r in edge],
        where="post",
        color="black",
        alpha=0.4,
        label="frontier",
    )
    ax.set(
        title=f"internvl on {TILES_TASK}: accuracy against pipeline FLOPs",
        xlabel="pipeline FLOPs (% of the large model alone at 3 tiles + thumbnail)",
        ylabel="exact match (%)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: Path, data: dict, command: str) -> Path:
    """JSON, plot, and the marked section of ``proving_ground.md`` (replaced in place, or appended)."""
    lines = section(data, command)
    return write_section(out_dir, "proving_ground_units", data, command, plot, lines, START, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (models/, tasks/)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where the report and plot go")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/study"), help="cached finished points")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test samples")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    command = "python -m lmms_sgl.proving.unit_selection" + (f" --limit {args.limit}" if args.limit else "")
    data = run(args.root.resolve(), args.work_dir, args.limit, args.batch_size)
    logger.info(f"wrote {write(args.out, data, command)}")


if __name__ == "__main__":
    main()
