"""Bad knobs fail early with the argument, the value and the allowed range."""

from __future__ import annotations

import pytest
import torch

from lmms_sgl.method.selection import LayoutMismatchError, keep_count, plan_from_scores
from lmms_sgl.method.settings import SGLSettings


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"keep_ratio": 0.0}, r"keep_ratio=0.0 is outside the allowed range \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio=1.5 is outside the allowed range \(0, 1\]"),
        ({"prune_layer": 1.0}, r"prune_layer=1.0 is outside the allowed range \[0, 1\)"),
        ({"prune_layer": -0.1}, r"prune_layer=-0.1 is outside"),
        ({"exit_threshold": 1.2}, r"exit_threshold=1.2 is outside the allowed range \[0, 1\]"),
        ({"consistency_ratio": 0.0}, r"consistency_ratio=0.0 is outside"),
        ({"method": "magic"}, r"method='magic' is not one of"),
        ({"method": "fastv", "exit_threshold": 0.5}, r"exit_threshold applies to method='sgl' only"),
    ],
)
def test_bad_knobs_name_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SGLSettings(**kwargs)


def test_unknown_token_ratio_preset():
    with pytest.raises(ValueError, match=r"token_ratio=0.5 is not a preset; allowed: \[0.09, 0.35, 0.64\]"):
        SGLSettings.from_token_ratio(0.5)


def test_fastv_needs_k_at_least_one():
    with pytest.raises(ValueError, match="needs K >= 1"):
        SGLSettings(method="fastv", prune_layer=0.05).layer_k(4)


@pytest.mark.parametrize("n,ratio,expected", [(256, 0.05, 12), (1792, 0.4, 716), (3, 0.05, 1), (0, 0.5, 0)])
def test_keep_count_floors_and_keeps_at_least_one(n, ratio, expected):
    assert keep_count(n, ratio) == expected


def test_plan_keeps_text_and_top_visual_in_order():
    vis = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    scores = [torch.tensor([0.1, 0.9, 0.2, 0.8]), torch.tensor([0.3, 0.7])]
    plan = plan_from_scores(scores, vis, mask, 0.5)
    assert plan.kept_visual == (2, 1) and plan.total_visual == (4, 2)
    assert plan.index[0][plan.valid[0]].tolist() == [0, 1, 3, 5, 6]
    assert plan.index[1][plan.valid[1]].tolist() == [2, 3, 4, 5, 6]  # padding position 0 dropped
    assert plan.pruned_length == 5 and bool(plan.valid.all())
    with pytest.raises(LayoutMismatchError, match="3 importance scores for 4 visual tokens"):
        plan_from_scores([torch.ones(3), None], vis, mask, 0.5)
