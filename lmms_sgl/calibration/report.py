"""What calibration shows and writes: Markdown tables, the JSON payload, the two plots.

Files are written only once everything is computed, each through a temporary file renamed into
place, so a failing run never leaves half a JSON or a stale plot behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lmms_sgl.calibration.calibrate import TaskCalibration
from lmms_sgl.calibration.replay import ReplayPoint
from lmms_sgl.calibration.runs import Run, with_exit_threshold


def threshold_text(threshold: float | None) -> str:
    return "never" if threshold is None else f"{threshold:.6g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def accuracy_text(value: float, fraction: bool) -> str:
    return f"{100 * value:.1f}" if fraction else f"{value:.4g}"


def model_args_fragment(point: ReplayPoint) -> str:
    return "exit_threshold=none" if point.threshold is None else f"exit_threshold={point.threshold!r}"


def task_table(result: TaskCalibration) -> str:
    unit = " %" if result.fraction else ""
    lines = [
        f"| threshold | exit rate % | large-model calls % | {result.metric}{unit} | FLOPs % of large alone |",
        "|---|---|---|---|---|",
    ]
    for point in result.table:
        mark = " **(chosen)**" if result.recommended is not None and point == result.recommended else ""
        lines.append(
            f"| {threshold_text(point.threshold)}{mark} | {_pct(point.exit_rate)} | "
            f"{_pct(point.large_call_rate)} | {accuracy_text(point.accuracy, result.fraction)} | "
            f"{_pct(point.flops_ratio)} |"
        )
    return "\n".join(lines)


def task_text(result: TaskCalibration, run: Run) -> str:
    """The console report of one task: table, notes, the recommendation and its model_args."""
    lines = [f"## {result.task}: {result.metric}, {len(result.samples)} samples", "", task_table(result), ""]
    if result.ceiling is not None:
        lines.append(
            f"Note: {result.exited_in_run} samples already exited in this run; only thresholds <= "
            f"{result.ceiling!r} are replayable."
        )
    if any(p.flops_reference != "guide answer length" for p in result.curve):
        lines.append(
            "Note: these records do not carry the large model's reference cost at the guide's answer length; "
            "for replayed exits the FLOPs ratio counts the large model alone at its own answer length."
        )
    if result.recommended is not None:
        point, unit = result.recommended, " %" if result.fraction else ""
        lines += [
            f"Recommended for {result.target.describe()}: exit_threshold={threshold_text(point.threshold)} "
            f"(exit rate {_pct(point.exit_rate)} %, large-model calls {_pct(point.large_call_rate)} %, "
            f"{result.metric} {accuracy_text(point.accuracy, result.fraction)}{unit}, "
            f"FLOPs {_pct(point.flops_ratio)} %)",
            "",
            f"    --model_args {model_args_fragment(point)}",
            f"    --model_args {full_model_args(run, point)}",
        ]
    return "\n".join(lines)


def full_model_args(run: Run, point: ReplayPoint) -> str:
    return with_exit_threshold(run.model_args, point.threshold)


def payload(run: Run, results: list[TaskCalibration]) -> dict:
    """Everything computed, for ``--json`` (and read back by ``--apply``)."""
    tasks = {}
    for r in results:
        tasks[r.task] = {
            "metric": r.metric,
            "fraction": r.fraction,
            "samples": len(r.samples),
            "exited_in_run": r.exited_in_run,
            "replayable_ceiling": r.ceiling,
            "table": [p.as_dict() for p in r.table],
            "curve": [p.as_dict() for p in r.curve],
            "target": None
            if r.target is None
            else {k: v for k, v in vars(r.target).items() if v is not None},
            "recommended": None if r.recommended is None else r.recommended.as_dict(),
            "model_args_fragment": None if r.recommended is None else model_args_fragment(r.recommended),
            "model_args": None if r.recommended is None else full_model_args(run, r.recommended),
        }
    return {
        "run": str(run.results_path),
        "model": run.model,
        "model_args": run.model_args,
        "skipped": run.skipped,
        "tasks": tasks,
    }


def render_plot(results: list[TaskCalibration], path: Path) -> None:
    """Accuracy versus large-model calls and versus FLOPs, one curve per task, deciles and the
    chosen threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        scale = 100.0 if r.fraction else 1.0
        for ax, x in zip(axes, ("large_call_rate", "flops_ratio"), strict=True):
            curve = [p for p in r.curve if getattr(p, x) is not None]
            (line,) = ax.plot(
                [100 * getattr(p, x) for p in curve], [scale * p.accuracy for p in curve], "-", label=r.task
            )
            ax.plot(
                [100 * getattr(p, x) for p in r.table if getattr(p, x) is not None],
                [scale * p.accuracy for p in r.table if getattr(p, x) is not None],
                "o",
                color=line.get_color(),
                markersize=4,
            )
            if r.recommended is not None and getattr(r.recommended, x) is not None:
                ax.plot(
                    100 * getattr(r.recommended, x),
                    scale * r.recommended.accuracy,
                    "*",
                    color=line.get_color(),
                    markersize=14,
                    label=f"{r.task}: exit_threshold={threshold_text(r.recommended.threshold)}",
                )
    metric = ", ".join(sorted({r.metric + (" (%)" if r.fraction else "") for r in results}))
    axes[0].set(xlabel="large-model calls (%)", ylabel=metric, title="accuracy vs large-model calls")
    axes[1].set(xlabel="FLOPs, % of the large model alone", ylabel=metric, title="accuracy vs FLOPs")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def write_all(outputs: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write every output to a temporary file next to it, then move them all into place: either all
    outputs appear, or (on any error) none does."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
            os.close(handle)
            staged.append((Path(name), path))
            write(Path(name))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def json_writer(data: dict) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(data, indent=1) + "\n")


def plot_writer(results: list[TaskCalibration]) -> Callable[[Path], None]:
    return lambda path: render_plot(results, path)
