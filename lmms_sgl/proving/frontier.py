"""Accuracy against cost, twice: at the proving pair's own FLOPs and priced at a real pair.

Each measured point (and each exit threshold replayed from a guided point's records) becomes a row
with two costs: the FLOPs the run recorded, as a share of the proving large model alone, and the same
operating point priced at the family's real pair (:mod:`lmms_sgl.costs.operating_point`). A point is
on a frontier when no point costs as little or less and scores higher.

Mapping a point to the real pair keeps what the user asked for: the budget and the schedule. The
``K=0`` and ``K=1`` schedules keep their K and solve the keep ratio for the same layer-averaged budget
on the real model's depth (:func:`lmms_sgl.proving.points.schedule`); the paper's presets keep their
``(prune_layer, keep_ratio)``; points that pruned before the language model (DivPrune and VisionZip
by default) do so at the schedule's layer-averaged ratio, as in the study
(:func:`lmms_sgl.proving.study.baseline_points`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmms_sgl.costs.operating_point import OperatingPoint, PricedPair, point_ratio
from lmms_sgl.method.cost import PAPER_PRESETS, prune_layer_index, token_ratio
from lmms_sgl.method.registry import BEFORE_LM, method_named
from lmms_sgl.proving.points import guide_exact_match, schedule
from lmms_sgl.reporting.frontier import on_frontier
from lmms_sgl.reporting.paired import paired_gap

SCHEDULE_K = {"K=0": 0, "K=1": 1}


def real_schedule(summary: dict, real_layers: int) -> tuple[int, float]:
    """``(K, keep ratio)`` of a pruned point's budget and schedule on a model of ``real_layers``."""
    ratio, name = summary["target_ratio"], summary.get("schedule", "K=1")
    if name == "preset":
        prune_layer, keep = PAPER_PRESETS[ratio]
        return prune_layer_index(real_layers, prune_layer), keep
    layer_k = SCHEDULE_K[name]
    prune_layer, keep = schedule(ratio, real_layers, layer_k=layer_k)
    return layer_k, keep


def real_operating_point(summary: dict, real_layers: int, exit_rate: float = 0.0) -> OperatingPoint:
    """The point a user would run on the real pair for this proving point."""
    method = summary["method"]
    if summary.get("prune_layer") is None:
        return OperatingPoint(method, exit_rate=exit_rate)
    layer_k, keep = real_schedule(summary, real_layers)
    if summary["prune_layer"] == 0.0 or method_named(method).layers == BEFORE_LM:  # before the LM
        return OperatingPoint(method, 0, token_ratio(layer_k, real_layers, keep))
    return OperatingPoint(method, layer_k, keep, exit_rate)


@dataclass
class CostedRow:
    """One point on the accuracy / cost plane."""

    label: str
    budget: float | None  # target visual-token ratio; None for the large model and the guide alone
    guided: bool  # the guide chose the tokens and/or answered
    accuracy: float
    stderr: float
    scores: dict  # doc id -> score, for paired differences
    proving: float  # recorded pipeline FLOPs / proving large model alone
    real: float  # priced at the real pair / its large model alone
    exit_rate: float = 0.0
    on_proving: bool = False
    on_real: bool = False


def costed(summary: dict, label: str, pair: PricedPair) -> CostedRow:
    """A measured point's row."""
    method = method_named(summary["method"])
    point = real_operating_point(summary, pair.large.text.num_layers, summary.get("exit_rate", 0.0))
    return CostedRow(
        label,
        summary.get("target_ratio"),
        method.uses_guide,
        summary["accuracy"],
        summary["stderr"],
        summary["scores"],
        summary["flops_ratio"],
        point_ratio(pair, point),
        summary.get("exit_rate", 0.0),
    )


def exit_rows(summary: dict, payload: dict, thresholds: list[float], label: str, pair: PricedPair):
    """The guided point with each exit threshold, replayed from its no-exit records by the
    calibration's rule (an exiting sample answers with the guide's answer, at the guide's cost)."""
    from lmms_eval.api.metrics import mean

    from lmms_sgl.calibration.replay import exits_at, from_record, replay

    rows = payload["rows"]
    samples = [
        from_record(r["doc_id"], r, right, r["exact_match"])
        for r, right in zip(rows, guide_exact_match(rows), strict=True)
    ]
    out = []
    for threshold in thresholds:
        replayed = replay(samples, threshold, mean)
        exits = exits_at(samples, threshold)
        scores = {
            str(s.doc_id): s.guide_value if leave else s.final_value
            for s, leave in zip(samples, exits, strict=True)
        }
        n = len(samples)
        accuracy = replayed.accuracy
        point = real_operating_point(summary, pair.large.text.num_layers, replayed.exit_rate)
        out.append(
            CostedRow(
                f"{label}, exit >= {threshold:.3f}",
                summary["target_ratio"],
                True,
                accuracy,
                (accuracy * (1 - accuracy) / n) ** 0.5,
                scores,
                replayed.flops_ratio,
                point_ratio(pair, point),
                replayed.exit_rate,
            )
        )
    return out


def mark_frontiers(rows: list[CostedRow]) -> None:
    """Set ``on_proving`` / ``on_real``: no other row costs as little or less and scores higher."""
    for cost, flag in (("proving", "on_proving"), ("real", "on_real")):
        marked = on_frontier([getattr(r, cost) for r in rows], [r.accuracy for r in rows])
        for row, on in zip(rows, marked, strict=True):
            setattr(row, flag, on)


def gap_to_frontier(row: CostedRow, rows: list[CostedRow], cost: str) -> tuple[CostedRow, float, float]:
    """The most accurate row costing no more than ``row``, and its paired lead over ``row``."""
    cheaper = [r for r in rows if getattr(r, cost) <= getattr(row, cost)]
    best = max(cheaper, key=lambda r: (r.accuracy, -getattr(r, cost)))
    if best is row:
        return row, 0.0, 0.0
    gap, err, _ = paired_gap(best.scores, row.scores)
    return best, gap, err


def budget_goal(rows: list[CostedRow], cost: str = "real") -> list[str]:
    """Per budget: the guided point closest to the frontier (in paired standard errors), and whether
    it is on the frontier or within one standard error of it."""
    lines = []
    for budget in sorted({r.budget for r in rows if r.budget is not None}, reverse=True):
        guided = [r for r in rows if r.guided and r.budget == budget]
        if not guided:
            continue
        scored = []
        for row in guided:
            best, gap, err = gap_to_frontier(row, rows, cost)
            scored.append((gap / err if err else (0.0 if gap <= 0 else float("inf")), row, best, gap, err))
        _, row, best, gap, err = min(scored, key=lambda item: (item[0], getattr(item[1], cost)))
        below = f"{100 * gap:.1f} ± {100 * err:.1f} points below {best.label}"
        where = "on the frontier" if best is row else f"{below} ({100 * getattr(best, cost):.1f} %)"
        met = best is row or gap <= err
        lines.append(
            f"- {100 * budget:.0f} %: {row.label} ({100 * row.accuracy:.1f} %, "
            f"{100 * getattr(row, cost):.1f} % FLOPs) is {where}: **{'met' if met else 'not met'}**."
        )
    return lines
