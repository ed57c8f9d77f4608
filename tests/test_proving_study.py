"""The exit sweep replay: its endpoints must equal the two runs it stands between."""

from __future__ import annotations

from lmms_sgl.proving.study import NEVER, exit_sweep


def _row(target, guide, large_right, score, guide_flops, flops):
    return {
        "target": target,
        "guide_answer": guide,
        "exact_match": large_right,
        "exit_score": score,
        "extra": {"guide_flops": guide_flops},
        "flops": flops,
        "flops_large_alone": 10.0,
    }


def test_sweep_endpoints_are_guide_only_and_no_exit():
    rows = [
        _row("red", "Red.", 1.0, 0.9, 2.0, 7.0),  # the task ignores case and punctuation
        _row("two", "three", 1.0, 0.2, 2.0, 7.0),
        _row("yes", "yes ", 0.0, 0.6, 2.0, 7.0),  # ...but not whitespace, as lmms-eval scores it
    ]
    all_exit, middle, none_exit = exit_sweep({"rows": rows}, [0.0, 0.5, NEVER])
    assert (all_exit["accuracy"], all_exit["large_call_rate"], all_exit["flops_ratio"]) == (1 / 3, 0.0, 0.2)
    assert (none_exit["accuracy"], none_exit["large_call_rate"], none_exit["flops_ratio"]) == (
        2 / 3,
        1.0,
        0.7,
    )
    assert (middle["accuracy"], middle["large_call_rate"]) == (2 / 3, 1 / 3)
