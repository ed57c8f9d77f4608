"""The study's two frontiers (``lmms_sgl.proving.frontier``): mapping to the real pair, Pareto
marking, the distance of a point to the frontier, and exit replays with per-question scores."""

from __future__ import annotations

import pytest

from lmms_sgl.costs.operating_point import OperatingPoint, real_pair
from lmms_sgl.method.cost import token_ratio
from lmms_sgl.proving.frontier import (
    CostedRow,
    budget_goal,
    exit_rows,
    gap_to_frontier,
    mark_frontiers,
    real_operating_point,
)
from lmms_sgl.proving.points import schedule
from lmms_sgl.reporting.frontier import on_frontier


def summary(method, ratio, name, exit_rate=0.0):
    return {
        "method": method,
        "target_ratio": ratio,
        "schedule": name,
        "prune_layer": 0.1,
        "exit_rate": exit_rate,
    }


def test_real_operating_point_keeps_budget_and_schedule():
    layers = 48
    zero = real_operating_point(summary("sgl", 0.09, "K=0"), layers)
    assert (zero.method, zero.layer_k, zero.keep_ratio) == ("sgl", 0, pytest.approx(0.09))
    _, keep = schedule(0.35, layers, layer_k=1)
    assert real_operating_point(summary("pdrop", 0.35, "K=1"), layers) == OperatingPoint("pdrop", 1, keep)
    assert real_operating_point(summary("sgl", 0.35, "preset"), layers, 0.3) == OperatingPoint(
        "sgl", int(0.2 * layers), 0.2, 0.3
    )
    # VisionZip prunes before the language model at the schedule's layer-averaged ratio
    before = real_operating_point(summary("visionzip", 0.35, "preset"), layers)
    assert before == OperatingPoint("visionzip", 0, token_ratio(int(0.2 * layers), layers, 0.2))
    # DivPrune moved to layer K keeps the schedule, like SGL
    at_k = real_operating_point(summary("divprune", 0.35, "preset"), layers)
    assert at_k == OperatingPoint("divprune", int(0.2 * layers), 0.2)
    assert real_operating_point({"method": "large_only", "prune_layer": None}, layers).method == "large_only"


def row(label, accuracy, proving, real, offset=0, budget=0.09, guided=True):
    """``accuracy`` of 100 questions, right on questions ``offset`` to ``offset + 100 accuracy``."""
    right = round(accuracy * 100)
    scores = {str(i): float(offset <= i < offset + right) for i in range(100)}
    return CostedRow(label, budget, guided, accuracy, 0.04, scores, proving, real)


def test_on_frontier_keeps_the_best_of_equal_costs_and_refuses_unequal_lengths():
    assert on_frontier([0.5, 0.5, 0.2, 1.0], [0.6, 0.7, 0.6, 0.65]) == [False, True, True, False]
    with pytest.raises(ValueError, match="2 costs but 1 scores"):
        on_frontier([0.1, 0.2], [0.5])


def test_frontier_marks_points_no_cheaper_point_beats():
    rows = [
        row("a", 0.5, 0.1, 0.4),
        row("b", 0.7, 0.3, 0.2),
        row("c", 0.6, 0.5, 0.5),
        row("d", 0.9, 1.0, 1.0),
    ]
    mark_frontiers(rows)
    assert [r.label for r in rows if r.on_proving] == ["a", "b", "d"]
    assert [r.label for r in rows if r.on_real] == ["b", "d"]
    best, gap, err = gap_to_frontier(rows[2], rows, "real")
    assert best.label == "b" and gap == pytest.approx(0.1) and err > 0
    assert gap_to_frontier(rows[1], rows, "real")[0] is rows[1]


def test_budget_goal_names_the_closest_guided_point():
    rows = [
        row("guided far", 0.5, 0.5, 0.5),
        row("guided near", 0.68, 0.5, 0.5, offset=10),  # 10 questions DivPrune misses, 12 it answers
        row("divprune", 0.7, 0.3, 0.3, guided=False),
    ]
    mark_frontiers(rows)
    lines = budget_goal(rows, "real")
    assert len(lines) == 1 and "guided near" in lines[0] and "2.0 ± 4.3" in lines[0] and "**met**" in lines[0]
    nested = row("guided nested", 0.68, 0.5, 0.5)  # the same lead, on a subset: a small standard error
    rows[1] = nested
    assert "guided nested" in budget_goal(rows, "real")[0] and "**not met**" in budget_goal(rows, "real")[0]
    assert "**not met**" in budget_goal(rows, "real")[0]


def test_exit_rows_score_each_question_as_the_replay_does():
    """Exit replays: a question whose exit score reaches the threshold is scored on the guide's answer."""
    rows = []
    for i in range(10):
        rows.append(
            {
                "doc_id": i,
                "target": "red",
                "exact_match": float(i % 2 == 0),  # the large model: right on even questions
                "guide_answer": "red" if i < 5 else "blue",  # the guide: right on the first five
                "exit_score": i / 10,
                "exited": False,
                "reached_large": True,
                "flops": 10.0,
                "flops_large_alone": 10.0,
                "extra": {"guide_flops": 2.0},
            }
        )
    point = summary("sgl", 0.09, "K=0")
    [at_half] = exit_rows(point, {"rows": rows}, [0.5], "sgl", real_pair("llava"))
    expected = [float(i % 2 == 0) if i < 5 else 0.0 for i in range(10)]  # 5..9 exit with a wrong answer
    assert at_half.scores == {str(i): v for i, v in enumerate(expected)}
    assert at_half.accuracy == pytest.approx(sum(expected) / 10) and at_half.exit_rate == 0.5
    assert at_half.proving == pytest.approx((5 * 10 + 5 * 2) / 100)
