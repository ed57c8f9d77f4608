"""Replay an exit threshold from one logged SGL run, exactly as a real run at that threshold counts it.

A sample exits when ``should_exit`` (the pipeline's own rule, float32 scores) says so at the
threshold; it then answers with the guide's answer, costs the guide's FLOPs only, and is scored with
the metric values of the guide's answer. Otherwise it keeps the logged large-model answer, metric
values and FLOPs. Accuracy is the task's own aggregation over documents in doc-id order, as
lmms-eval aggregates them; exit rate, large-model call rate and FLOPs ratio are computed from
summed counts as in ``lmms_sgl.reporting.stats``.

The reference FLOPs of an exited sample (the large model alone) are, in a real exit run, counted at
the guide's answer length. A record that carries ``extra["exit_flops_large_alone"]`` gives exactly
that; otherwise the large model's own answer length is used and the point says so
(``flops_reference="large answer length"``); the two differ only when the answers differ in length.

A run that already exited cannot be replayed above its threshold: its exited samples have no large
answer. :func:`replayable_ceiling` gives the highest threshold that can be.

The logged run computed every exit score (``record_exit_score=true``), so its guide paid the
consistency pass; a real run without a threshold skips it. "No exit" (``threshold=None``) therefore
leaves out each record's ``extra["consistency_flops"]`` (older records without it: nothing to leave
out, their runs always paid it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lmms_sgl.calibration import CalibrationError
from lmms_sgl.method.early_exit import should_exit

EXIT_REFERENCE = "exit_flops_large_alone"


@dataclass(frozen=True)
class ReplaySample:
    doc_id: int
    exit_score: float | None  # None: cannot exit (no guide answer)
    exited: bool  # exited in the logged run (then it has no large answer)
    reached_large: bool
    guide_value: Any  # the metric value of the guide's answer (None when it cannot exit)
    final_value: Any  # the metric value logged for the run's answer
    flops: float
    guide_flops: float
    flops_large_alone: float
    exit_flops_large_alone: float | None = None
    consistency_flops: float = 0.0  # the guide's consistency pass, part of ``flops``


@dataclass(frozen=True)
class ReplayPoint:
    threshold: float | None  # None: never exit
    samples: int
    exit_rate: float
    large_call_rate: float
    accuracy: float
    flops_ratio: float | None
    tflops: float
    tflops_large_alone: float
    flops_reference: str  # "guide answer length" (as a real run counts it) or "large answer length"

    def as_dict(self) -> dict:
        return asdict(self)


def from_record(doc_id: int, record: dict, guide_value: Any, final_value: Any) -> ReplaySample:
    """A replay sample from our per-sample record (``SampleRecord.as_dict()``)."""
    extra = record.get("extra") or {}
    can_exit = record.get("guide_answer") is not None and record.get("exit_score") is not None
    return ReplaySample(
        doc_id=doc_id,
        exit_score=float(record["exit_score"]) if can_exit else None,
        exited=bool(record.get("exited")),
        reached_large=bool(record.get("reached_large", not record.get("exited"))),
        guide_value=guide_value if can_exit else None,
        final_value=final_value,
        flops=float(record.get("flops") or 0.0),
        guide_flops=float(extra.get("guide_flops") or 0.0),
        flops_large_alone=float(record.get("flops_large_alone") or 0.0),
        exit_flops_large_alone=extra.get(EXIT_REFERENCE),
        consistency_flops=float(extra.get("consistency_flops") or 0.0),
    )


def exits_at(samples: Sequence[ReplaySample], threshold: float | None) -> list[bool]:
    """Which samples exit at ``threshold`` under the pipeline's rule (``None``: none)."""
    scores = torch.tensor([s.exit_score if s.exit_score is not None else 0.0 for s in samples])
    decided = should_exit(scores.to(torch.float32), threshold).tolist()
    return [bool(d) and s.exit_score is not None for d, s in zip(decided, samples, strict=True)]


def replayable_ceiling(samples: Sequence[ReplaySample]) -> float | None:
    """The highest replayable threshold: the lowest exit score among samples the run already
    exited (any higher threshold would send one of them to a large model that never answered);
    ``None`` when nothing exited (every threshold, and no exit at all, can be replayed)."""
    exited = [s.exit_score for s in samples if s.exited]
    return min(exited) if exited else None


def replay(
    samples: Sequence[ReplaySample], threshold: float | None, aggregate: Callable[[list], float]
) -> ReplayPoint:
    """The run as it would have been with ``exit_threshold=threshold``."""
    if not samples:
        raise CalibrationError("nothing to replay: no samples")
    exits = exits_at(samples, threshold)
    values, flops, alone, calls = [], 0.0, 0.0, 0
    approximate = False
    for sample, leave in zip(samples, exits, strict=True):
        if sample.exited and not leave:
            raise CalibrationError(
                f"threshold {threshold!r} cannot be replayed: document {sample.doc_id} exited in the logged "
                "run and has no large-model answer"
            )
        if leave:
            values.append(sample.guide_value)
            flops += sample.guide_flops if not sample.exited else sample.flops
            if sample.exited:  # the run counted its reference at the guide's answer length
                alone += sample.flops_large_alone
            elif sample.exit_flops_large_alone is not None:
                alone += float(sample.exit_flops_large_alone)
            else:
                alone += sample.flops_large_alone
                approximate = True
        else:
            values.append(sample.final_value)
            flops += sample.flops - (sample.consistency_flops if threshold is None else 0.0)
            alone += sample.flops_large_alone
            calls += int(sample.reached_large)
    n = len(samples)
    return ReplayPoint(
        threshold=threshold,
        samples=n,
        exit_rate=sum(exits) / n,
        large_call_rate=calls / n,
        accuracy=float(aggregate(values)),
        flops_ratio=flops / alone if alone else None,
        tflops=flops / 1e12,
        tflops_large_alone=alone / 1e12,
        flops_reference="large answer length" if approximate else "guide answer length",
    )


def deciles(samples: Sequence[ReplaySample]) -> list[float]:
    """The exit scores at the 10 %, ..., 90 % quantiles (each an observed score, so that a real run
    at that threshold takes exactly the replayed decision)."""
    scores = sorted(s.exit_score for s in samples if s.exit_score is not None)
    if not scores:
        return []
    return sorted({scores[min(len(scores) - 1, int(q / 10 * len(scores)))] for q in range(1, 10)})


def candidates(samples: Sequence[ReplaySample], most: int = 512) -> list[float | None]:
    """Thresholds that change the decision, highest first: ``None`` (never exit, when the run can
    replay it), then observed scores (all of them, or ``most`` evenly spaced in rank on large runs,
    always including the lowest); limited to what the run can replay."""
    ceiling = replayable_ceiling(samples)
    scores = sorted({s.exit_score for s in samples if s.exit_score is not None}, reverse=True)
    if ceiling is not None:
        scores = [s for s in scores if s <= ceiling]
    if len(scores) > most:
        step = (len(scores) - 1) / (most - 1)
        scores = sorted({scores[round(i * step)] for i in range(most)}, reverse=True)
    return ([None] if ceiling is None else []) + scores


def sweep(
    samples: Sequence[ReplaySample], thresholds: Sequence[float | None], aggregate: Callable[[list], float]
) -> list[ReplayPoint]:
    return [replay(samples, t, aggregate) for t in thresholds]


@dataclass(frozen=True)
class Target:
    """What the user asks for: exactly one of an exit rate, an accuracy drop (points), a FLOPs budget."""

    exit_rate: float | None = None
    max_drop: float | None = None  # in points of the metric as displayed (percent for 0-1 metrics)
    flops_budget: float | None = None

    def describe(self) -> str:
        if self.exit_rate is not None:
            return f"exit rate closest to {100 * self.exit_rate:g} %"
        if self.max_drop is not None:
            return f"at most {self.max_drop:g} points below no exit"
        return f"FLOPs at most {100 * self.flops_budget:g} % of the large model alone"


def choose(points: Sequence[ReplayPoint], target: Target, points_per_unit: float) -> ReplayPoint:
    """The replayed point that meets ``target`` (``points`` ordered from no/fewest exits to most).

    * exit rate: the closest; on a tie the fewer exits;
    * max drop: the most exits such that no point from "no exit" down to it loses more than the
      allowed points (a lucky dip below a bad stretch is not taken);
    * FLOPs budget: the fewest exits whose FLOPs ratio is within the budget.
    ``points_per_unit`` converts accuracy to displayed points (100 for a 0-1 metric).
    """
    if not points:
        raise CalibrationError("no replayable threshold")
    if target.exit_rate is not None:
        return min(points, key=lambda p: abs(p.exit_rate - target.exit_rate))  # first = fewer exits
    if target.max_drop is not None:
        reference = points[0].accuracy
        chosen = points[0]
        for point in points:
            if (reference - point.accuracy) * points_per_unit > target.max_drop + 1e-9:
                break
            chosen = point
        return chosen
    within = [p for p in points if p.flops_ratio is not None and p.flops_ratio <= target.flops_budget]
    if not within:
        lowest = min(p.flops_ratio for p in points if p.flops_ratio is not None)
        raise CalibrationError(
            f"--flops-budget {target.flops_budget:g} is out of reach: even the most exits replayable cost "
            f"{lowest:.4f} of the large model alone"
        )
    return within[0]
