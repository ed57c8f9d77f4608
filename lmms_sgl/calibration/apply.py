"""``--apply``: a threshold chosen on one run (e.g. a validation split), checked on another run.

The other run is either a real run made with that ``exit_threshold`` (realised numbers are that
run's own: its exit rate, lmms-eval's aggregated metric, its FLOPs) or a run without exits (the
threshold is then replayed on it). A run that exited at another threshold is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmms_sgl.calibration import CalibrationError
from lmms_sgl.calibration.runs import Run, TaskLog


@dataclass(frozen=True)
class Chosen:
    """One recommendation read from a calibration JSON."""

    source_task: str
    metric: str
    fraction: bool
    threshold: float | None
    predicted: dict  # the replayed point on the calibration run


def read_calibration(path: Path) -> dict[str, Chosen]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CalibrationError(f"--apply {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise CalibrationError(f"--apply {path}: not JSON ({error})") from None
    chosen = {}
    for task, entry in (data.get("tasks") or {}).items():
        point = entry.get("recommended")
        if point is not None:
            chosen[task] = Chosen(task, entry["metric"], bool(entry["fraction"]), point["threshold"], point)
    if not chosen:
        raise CalibrationError(
            f"--apply {path}: holds no recommended threshold; write it with lmms-sgl-calibrate RUN "
            "--target-exit-rate R | --max-drop P | --flops-budget F --json FILE"
        )
    return chosen


def chosen_for(task: str, chosen: dict[str, Chosen], source: str | None) -> Chosen:
    """The recommendation to apply to ``task``: ``--source-task``, the same task, or the only one."""
    if source is not None:
        if source not in chosen:
            raise CalibrationError(f"--source-task {source}: the calibration has {', '.join(chosen)}")
        return chosen[source]
    if task in chosen:
        return chosen[task]
    if len(chosen) == 1:
        return next(iter(chosen.values()))
    raise CalibrationError(
        f"task {task}: the calibration recommends thresholds for {', '.join(chosen)}; "
        "pick one with --source-task"
    )


def realised_from_run(run: Run, log: TaskLog, choice: Chosen) -> dict:
    """The numbers a real exit run reports for ``log``'s task (no replay)."""
    if run.exit_threshold != choice.threshold:
        raise CalibrationError(
            f"{run.results_path.name} was made with exit_threshold={run.model_arg('exit_threshold')}; the "
            f"calibration chose {choice.threshold!r}: rerun with exit_threshold={choice.threshold!r}, or "
            "apply it to a run without exits"
        )
    scores = run.results.get("results", {}).get(log.name, {})
    metrics = [k for k in scores if "," in k and "stderr" not in k and isinstance(scores[k], (int, float))]
    keys = [k for k in metrics if k.split(",")[0] == choice.metric] or metrics[:1]
    if not keys:
        raise CalibrationError(f"{run.results_path.name}: no metric result for {log.name}")
    records = [s.record for s in log.samples]
    alone = sum(float(r.get("flops_large_alone") or 0) for r in records)
    return {
        "threshold": choice.threshold,
        "samples": len(records),
        "exit_rate": sum(bool(r.get("exited")) for r in records) / len(records),
        "large_call_rate": sum(bool(r.get("reached_large")) for r in records) / len(records),
        "accuracy": float(scores[keys[0]]),
        "metric": keys[0].split(",")[0],
        "flops_ratio": sum(float(r.get("flops") or 0) for r in records) / alone if alone else None,
        "source": "real run",
    }
