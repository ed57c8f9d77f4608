"""The study helpers: the exit sweep replay (its endpoints must equal the two runs it stands between),
the points the studies run, and the unit-selection study's frontier and comparisons."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmms_sgl.proving.study import NEVER, exit_sweep

REPO = Path(__file__).resolve().parent.parent


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


def test_paper_presets_run_every_method_that_can_rank():
    from lmms_sgl.method.cost import prune_layer_index, token_ratio
    from lmms_sgl.proving.study import points, series

    presets = [p for p in points("internvl", 12) if p.schedule == "preset"]
    by_ratio = {}
    for p in presets:
        by_ratio.setdefault(p.target_ratio, []).append(p)
    # K = int(12 x prune_layer): 4, 2, 0; FastV and PDrop read layer K-1's attention, so not at K = 0;
    # DivPrune and VisionZip prune before the LM at every preset
    assert {r: sorted(p.method for p in ps) for r, ps in by_ratio.items()} == {
        0.64: ["divprune", "fastv", "pdrop", "random", "sgl", "visionzip"],
        0.35: ["divprune", "fastv", "pdrop", "random", "sgl", "visionzip"],
        0.09: ["divprune", "random", "sgl", "visionzip"],
    }
    for ps in by_ratio.values():  # K = 0 methods keep the layer-averaged ratio SGL's preset gives
        sgl = next(p for p in ps if p.method == "sgl")
        before = [p for p in ps if p.method in ("divprune", "visionzip")]
        expected = token_ratio(prune_layer_index(12, sgl.prune_layer), 12, sgl.keep_ratio)
        assert all(p.prune_layer == 0.0 and p.keep_ratio == pytest.approx(expected) for p in before)
    ks = {r: prune_layer_index(12, ps[0].prune_layer) for r, ps in by_ratio.items()}
    assert ks == {0.64: 4, 0.35: 2, 0.09: 0}
    assert token_ratio(2, 12, by_ratio[0.35][0].keep_ratio) == 1 / 3
    # preset points have their own cache keys and curves
    keys = [p.key for p in points("internvl", 12)]
    assert len(keys) == len(set(keys))
    summary = {"method": "sgl", "prune_layer": 0.2, "schedule": "preset", "num_layers": 12}
    assert series(summary) == "sgl preset"
    assert series({**summary, "schedule": "K=1"}) == "sgl"


def test_comparison_states_each_schedule_with_standard_errors():
    from lmms_sgl.proving.study import comparison

    def run(right, n=100):
        """The first ``right`` of ``n`` questions answered correctly."""
        scores = {str(i): float(i < right) for i in range(n)}
        return {"accuracy": right / n, "scores": scores}

    by = {
        ("sgl preset", 0.64): run(90),
        ("fastv preset", 0.64): run(50),
        ("sgl preset", 0.35): run(80),
        ("fastv preset", 0.35): run(79),
        ("sgl preset", 0.09): run(60),
    }
    said = comparison(by, "preset", "fastv")
    # paired: d = 1 on 40 questions, 0 on 60 -> mean 0.4, s.e. sqrt(100 x 0.4 x 0.6 / 99 / 100) = 4.9
    assert said.startswith("better at 64 % (+40.0 ± 4.9)")
    assert "within two standard errors at 35 %" in said
    assert "not run at 9 % (K = 0" in said


def test_unit_study_points_are_valid_model_arguments():
    from lmms_eval.utils import simple_parse_args_string

    from lmms_sgl.lmms.args import check_schedule, parse_model_args
    from lmms_sgl.proving.unit_selection import EXIT_FROM, REFERENCE, operating_points

    ops = operating_points(12)
    labels = [op.label for op in ops]
    assert len(labels) == len(set(labels)) and REFERENCE in labels and set(EXIT_FROM) <= set(labels)
    assert len({op.point.key for op in ops}) == len(ops)
    for op in ops:  # what the study passes is accepted before any model loads
        args = parse_model_args(**simple_parse_args_string(op.point.model_args(REPO)))
        check_schedule(args, 12)
        if op.kind == "units":
            assert args.settings.keep_units == op.point.keep_units
            assert args.settings.keep_global_view == op.point.keep_global_view
    by_label = {op.label: op.point for op in ops}
    assert (
        by_label["units: best 1 of 4 (thumbnail competes), guide at 1 tile"]
        .model_args(REPO)
        .endswith("keep_units=1,keep_global_view=false")
    )
    assert by_label["large model downsampled to 1 tile"].max_tiles == 1


def _unit_row(label, kind, accuracy, flops, scores):
    return {"label": label, "kind": kind, "accuracy": accuracy, "flops_ratio": flops, "scores": scores}


def test_unit_study_frontier_and_paired_comparison():
    from lmms_sgl.proving.unit_selection import against_downsampled, frontier

    rows = [
        _unit_row("large", "reference", 0.9, 1.0, {}),
        _unit_row("low", "downsampled", 0.5, 0.2, {0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0}),
        _unit_row("units", "units", 0.75, 0.2, {0: 1.0, 1: 1.0, 2: 0.0, 3: 1.0}),
        _unit_row("dominated", "tokens", 0.7, 0.5, {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}),
        _unit_row("tie", "tokens", 0.75, 0.3, {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}),
    ]
    assert frontier(rows) == ["units", "large"]
    versus, dominated, tie = against_downsampled(rows)
    assert [c["kind"] for c in (versus, dominated, tie)] == ["units", "tokens", "tokens"]
    # differences 1, 0, 0, 0: mean 0.25, s.e. sqrt(0.25 / 4) = 0.25 -> not 2 s.e.
    assert versus["gap"] == pytest.approx(0.25) and versus["gap_stderr"] == pytest.approx(0.25)
    assert versus["no_more_flops"] and not versus["beats"]


def test_unit_study_exit_replay_equals_the_calibration_sweep():
    from lmms_sgl.proving.unit_selection import EXIT_THRESHOLDS, describe, exit_replays

    rows = [
        {
            **_row("red", "Red.", 0.0, 0.95, 2.0, 7.0),
            "doc_id": 0,
            "vision_units": 3,
            "vision_units_encoded": 2,
        },
        {
            **_row("two", "three", 1.0, 0.65, 2.0, 6.0),
            "doc_id": 1,
            "vision_units": 3,
            "vision_units_encoded": 2,
        },
        {
            **_row("yes", "yes", 1.0, 0.75, 2.0, 9.0),
            "doc_id": 2,
            "vision_units": 3,
            "vision_units_encoded": 3,
        },
    ]
    reference = {d: {"correct": 1.0, "flops": 10.0} for d in range(3)}
    replays = exit_replays("u", {"rows": rows})
    swept = exit_sweep({"rows": rows}, list(EXIT_THRESHOLDS))
    for (label, table), expected in zip(replays, swept, strict=True):
        row = describe(label, "exit", table, reference)
        assert row["accuracy"] == pytest.approx(expected["accuracy"])
        assert row["flops_ratio"] == pytest.approx(expected["flops_ratio"])
        assert 1 - row["exit_rate"] == pytest.approx(expected["large_call_rate"])


def test_unit_study_section_is_written_and_survives_a_study_rerun(tmp_path):
    import json

    from lmms_sgl.proving import study, unit_selection
    from lmms_sgl.proving.unit_selection import against_downsampled, describe, frontier

    def table(correct, flops, encoded):
        return {
            d: {"correct": c, "flops": flops, "units": (encoded, 4), "fallback": False}
            for d, c in enumerate(correct)
        }

    reference = table([1, 1, 1, 0], 10.0, 4)
    rows = [
        describe(unit_selection.REFERENCE, "reference", reference, reference),
        describe("large model downsampled to 1 tile", "downsampled", table([0, 0, 1, 0], 1.0, 1), reference),
        describe(
            "units: 1 tile + thumbnail, guide at 1 tile", "units", table([1, 1, 1, 0], 2.0, 2), reference
        ),
    ]
    data = {"task": "t", "limit": 4, "rows": rows, "frontier": frontier(rows)}
    data["against_downsampled"] = against_downsampled(rows)
    unit_selection.write(tmp_path, data, "python -m lmms_sgl.proving.unit_selection --limit 4")
    study.write_report(tmp_path, {"summaries": {}, "sweeps": {}, "checks": {}, "wide": []}, "cmd")
    text = (tmp_path / "proving_ground.md").read_text()
    assert text.count(unit_selection.START) == 1 and text.rstrip().endswith(unit_selection.END)
    assert "| 2 | units: 1 tile + thumbnail, guide at 1 tile | units | 75.0 |" in text
    assert "| 20.0 | 0.00 | 2.00 / 4 | - |" in text  # pipeline FLOPs 2 / 10, units encoded / given
    # +50 points over the downsampled model (d = 1, 1, 0, 0: s.e. 0.289) at twice its FLOPs: the goal
    # needs equal or lower FLOPs, so it is not met
    assert "| +50.0 ± 28.9 | within 2 s.e. |" in text
    assert "**The goal** (a unit-selection point beating" in text and "not met. At no more FLOPs" not in text
    assert "No unit-selection point is as cheap as a downsampled one" in text
    assert json.loads((tmp_path / "proving_ground_units.json").read_text())["command"].endswith("--limit 4")


def test_spread_study_points_parse_and_report_its_goals(tmp_path):
    """The spread study's points are valid model arguments (selection and radius included), its key
    keeps top-k points shared with make study, and the report states the 9 % goals from paired scores."""
    from lmms_sgl.lmms.args import parse_model_args
    from lmms_sgl.proving import spread

    points = spread.test_points("llava", 12, 2)
    spread_points = [p for p in points if p.selection == "spread"]
    assert len(spread_points) == 13 and all(p.key.endswith("spread2") for p in spread_points)
    assert not any("spread" in p.key for p in points if p.selection == "topk")
    for point in spread_points:
        settings = parse_model_args(
            **dict(a.split("=", 1) for a in point.model_args(Path("/r")).split(","))
        ).settings
        assert (settings.selection, settings.spread_radius) == ("spread", 2)

    def row(method, accuracy, selection="topk", radius=None, schedule="K=0", ratio=0.09):
        scores = {str(i): float(i < accuracy * 100) for i in range(100)}
        return {
            "family": "llava",
            "method": method,
            "selection": selection,
            "spread_radius": radius,
            "schedule": schedule,
            "target_ratio": ratio,
            "accuracy": accuracy,
            "stderr": 0.01,
            "n": 100,
            "layer_k": 0,
            "flops_ratio": 0.3,
            "scores": scores,
            "prune_layer": 0.0,
        }

    large = {**row("large_only", 0.9), "target_ratio": None, "schedule": "K=1"}
    rows = [
        large,
        row("sgl", 0.7),
        row("sgl", 0.85, "spread", 2),
        {**row("divprune", 0.75), "schedule": "K=1"},
    ]
    goals = spread.goal_lines(rows, 2)
    assert "+10.0 ± 3.0" in goals[0] and "**met**" in goals[0]
    assert "94.4 %" in goals[1] and "**met**" in goals[1]
    table = "\n".join(spread.test_tables(rows, 2))
    assert "| K=0 | 9 | sgl topk | 0 | 70.0 |" in table and "+15.0 ± 3.6" in table


def test_auto_rule_is_scored_on_the_validation_cells():
    """``selection=auto``'s candidate rules are scored cell by cell (the spread run where a rule
    spreads, the top-k run elsewhere); the report says whether the shipped rule is the best."""
    from lmms_sgl.proving import spread

    def cell(layer_k, keep, topk, spreads):
        base = {"family": "llava", "method": "sgl", "layer_k": layer_k, "keep_ratio": keep}
        base |= {"schedule": f"K={layer_k}", "target_ratio": keep}
        return [
            {**base, "accuracy": topk},
            {**base, "selection": "spread", "spread_radius": 2, "accuracy": spreads},
        ]

    rows = [
        *cell(0, 0.09, 0.6, 0.8),
        *cell(0, 0.35, 0.8, 0.82),
        *cell(1, 0.05, 0.5, 0.6),
        *cell(1, 0.3, 0.9, 0.8),
    ]
    scores = spread.auto_scores(rows, 2)
    assert scores["always top-k (the paper)"] == pytest.approx((0.6 + 0.8 + 0.5 + 0.9) / 4)
    assert scores["spread from layer 0"] == pytest.approx((0.8 + 0.82 + 0.5 + 0.9) / 4)
    shipped = next(name for name in scores if name.startswith("shipped"))
    assert scores[shipped] == pytest.approx((0.8 + 0.82 + 0.6 + 0.9) / 4) == max(scores.values())
    assert "**the best**" in spread.auto_lines(rows, 2)[-1]
    rows = [*cell(0, 0.35, 0.9, 0.5)]  # spreading from layer 0 loses here: the shipped rule is not the best
    assert "**not the best**" in spread.auto_lines(rows, 2)[-1]
