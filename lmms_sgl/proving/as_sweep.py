"""The proving study's comparison as an ``lmms-sgl-sweep`` report, written by the sweep's own code.

Each study point (:func:`lmms_sgl.proving.grids.study_points`, evaluated by the sweep's engine)
becomes a sweep row; :func:`lmms_sgl.sweep.report.finish` then prices the rows at the family's real
pair, marks both frontiers, pairs every method with SGL at the same budget and schedule over the same
questions, and writes ``sweep.md``, ``sweep.json`` and the two plots under
``reports/proving_sweep/<family>/``: the table ``lmms-sgl-sweep --grid configs/sweeps/proving-<family>.yaml``
writes for the same points. The study's own report (per question type, retained accuracy, the
sections) is built on the same points.
"""

from __future__ import annotations

from pathlib import Path

from lmms_sgl.proving.points import FAMILIES, TASK, Point
from lmms_sgl.sweep.report import finish
from lmms_sgl.sweep.run import Row

SCHEDULE_K = {"K=1": 1, "K=0": 0}


def study_row(summary: dict, root: Path) -> Row:
    """A summarized study point as the sweep's row (``summary`` from
    :func:`lmms_sgl.proving.points.summarize`)."""
    fields = {k: summary[k] for k in Point.__dataclass_fields__ if k in summary}
    point = Point(**fields)
    target, schedule_name = point.target_ratio, point.schedule
    ratio = "" if point.prune_layer is None else f"{100 * target:g} % {schedule_name}"
    shared = {}
    if point.prune_layer is not None and schedule_name in SCHEDULE_K:
        shared = {"budget": target, "layer_k": SCHEDULE_K[schedule_name]}
    exit_rate = summary.get("exit_rate", 0.0)
    return Row(
        task=point.task,
        label=" ".join(filter(None, (point.method, ratio))),
        method=point.method,
        ratio=ratio,
        selection=point.selection if point.prune_layer is not None and point.method == "sgl" else None,
        layout={},
        exit_threshold=point.exit_threshold,
        replayed=False,
        metric="exact_match",
        value=summary["accuracy"],
        stderr=summary["stderr"],
        n=summary["n"],
        token_ratio=summary.get("token_ratio"),
        exit_rate=exit_rate,
        large_call_rate=0.0 if point.method == "guide_only" else 1.0 - exit_rate,
        flops_ratio=summary.get("flops_ratio"),
        seconds=None,
        model_args=point.model_args(root),
        folder="",
        scores=summary["scores"],
        schedule=shared,
    )


def write_sweep_report(family: str, summaries: list[dict], root: Path, out_dir: Path) -> Path:
    """``out_dir/proving_sweep/<family>/sweep.md`` (and its JSON and plots) for the study's points."""
    rows = [study_row(s, root) for s in summaries if s.get("task", TASK) == TASK]
    model = FAMILIES[family][0]
    header = {
        "command": "python -m lmms_sgl.proving.study",
        "grid": f"configs/sweeps/proving-{family}.yaml",
        "tasks": [TASK],
        "model": model,
        "notes": [
            "the proving study's points (lmms_sgl.proving.study), reported by lmms-sgl-sweep's code; "
            "FLOPs priced at the real pair keep each shared schedule's K and budget"
        ],
    }
    path, _ = finish(rows, out_dir / "proving_sweep" / family, header, family)
    return path
