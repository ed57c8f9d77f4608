"""Calibrate one task of a logged run: replay samples, the threshold table, the recommendation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from lmms_sgl.calibration import CalibrationError
from lmms_sgl.calibration.replay import (
    ReplayPoint,
    ReplaySample,
    Target,
    candidates,
    choose,
    deciles,
    from_record,
    replay,
    replayable_ceiling,
)
from lmms_sgl.calibration.runs import TaskLog
from lmms_sgl.calibration.scoring import TaskScorer, guide_metrics


@dataclass
class TaskCalibration:
    task: str
    metric: str
    fraction: bool  # per-sample values in [0, 1]: accuracy shown in percent, drops in percent points
    samples: list[ReplaySample]
    aggregate: Callable[[list], float]
    curve: list[ReplayPoint]  # every candidate threshold, from no exit to the most exits
    table: list[ReplayPoint]  # no exit, deciles, all exit (what the run can replay)
    recommended: ReplayPoint | None
    target: Target | None

    @property
    def points_per_unit(self) -> float:
        return 100.0 if self.fraction else 1.0

    @property
    def exited_in_run(self) -> int:
        return sum(s.exited for s in self.samples)

    @property
    def ceiling(self) -> float | None:
        return replayable_ceiling(self.samples)


def _is_fraction(values: list[Any]) -> bool:
    return all(
        isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) and 0 <= v <= 1
        for v in values
        if v is not None
    )


def pick_metric(scorer: TaskScorer, log: TaskLog, metric: str | None) -> str:
    metrics = scorer.metrics
    if metric is not None and metric not in metrics:
        raise CalibrationError(f"--metric {metric}: task {log.name} has metrics {', '.join(metrics)}")
    chosen = metric or metrics[0]
    missing = [s.doc_id for s in log.samples if chosen not in s.row]
    if missing:
        raise CalibrationError(
            f"{log.path.name}: metric {chosen!r} is not logged for documents {missing[:5]}; "
            f"logged keys: {', '.join(sorted(log.samples[0].row))}"
        )
    return chosen


def check_exit_scores(log: TaskLog) -> None:
    """Refuse, before any scoring, a run whose guide skipped its consistency pass (no exit
    threshold and no ``record_exit_score``): it has no exit score to replay."""
    if any(s.can_exit for s in log.samples):
        return
    if any("exit_score_skipped" in (s.record.get("extra") or {}) for s in log.samples):
        raise CalibrationError(
            f"{log.path.name}: the run recorded no exit scores (no exit_threshold, so the guide's "
            "consistency pass did not run); rerun without exit_threshold and with record_exit_score=true "
            "in --model_args"
        )


def replay_samples(scorer: TaskScorer, log: TaskLog, metric: str, cache_dir: Path) -> list[ReplaySample]:
    """Our records joined with the task's metric values of both answers, in doc-id order."""
    check_exit_scores(log)
    guide = guide_metrics(scorer, log, cache_dir)
    out = []
    for sample in log.samples:
        guide_value = guide[sample.doc_id][metric] if sample.doc_id in guide else None
        out.append(from_record(sample.doc_id, sample.record, guide_value, sample.row[metric]))
    return out


def table_thresholds(samples: list[ReplaySample]) -> list[float | None]:
    """No exit, the deciles of the exit score and 0 (everything exits), highest first, limited to
    what the run can replay."""
    ceiling = replayable_ceiling(samples)
    wanted = [None, *sorted(deciles(samples), reverse=True), 0.0]
    return [t for t in wanted if ceiling is None or (t is not None and t <= ceiling)]


def calibrate_task(
    scorer: TaskScorer, log: TaskLog, metric: str | None, target: Target | None, cache_dir: Path
) -> TaskCalibration:
    metric = pick_metric(scorer, log, metric)
    samples = replay_samples(scorer, log, metric, cache_dir)
    aggregate = scorer.aggregate(metric)
    fraction = _is_fraction([s.final_value for s in samples] + [s.guide_value for s in samples])
    if not any(s.exit_score is not None for s in samples):
        raise CalibrationError(f"task {log.name}: no sample has a guide answer and exit score")
    ceiling = replayable_ceiling(samples)
    if ceiling is not None:
        logger.warning(
            f"{log.name}: {sum(s.exited for s in samples)} of {len(samples)} samples already exited in this "
            f"run (exit scores >= {ceiling!r}); they have no large-model answer, so only thresholds <= "
            f"{ceiling!r} can be replayed and 'no exit' is unknown. Rerun without exit_threshold to see "
            "the whole curve."
        )
    if ceiling is not None and target is not None and target.max_drop is not None:
        raise CalibrationError(
            f"--max-drop {target.max_drop:g} is measured from the accuracy without exit, which this run "
            f"cannot replay ({sum(s.exited for s in samples)} samples of {log.name} already exited); "
            "rerun without exit_threshold"
        )
    curve = [replay(samples, t, aggregate) for t in candidates(samples)]
    table = [replay(samples, t, aggregate) for t in table_thresholds(samples)]
    recommended = None
    if target is not None:
        recommended = choose(curve, target, 100.0 if fraction else 1.0)
        if target.exit_rate is not None and curve and target.exit_rate < curve[0].exit_rate - 1e-12:
            raise CalibrationError(
                f"--target-exit-rate {target.exit_rate:g} cannot be replayed: this run already exited "
                f"{100 * curve[0].exit_rate:.1f} % of {log.name}; rerun without exit_threshold"
            )
        if recommended.threshold is None:
            logger.warning(f"{log.name}: the target is met only without early exit (exit_threshold=none)")
    if recommended is not None and all(p.threshold != recommended.threshold for p in table):
        table = sorted(
            [*table, recommended], key=lambda p: -math.inf if p.threshold is None else -p.threshold
        )
    return TaskCalibration(log.name, metric, fraction, samples, aggregate, curve, table, recommended, target)
