"""The proving study's points come from sweep grids: the same points (so the cache and the report
keep their figures) as the study's own rule written out here, and ``lmms-sgl-sweep`` validates the
written grid files into the same model arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmms_eval.utils import simple_parse_args_string

from lmms_sgl.method.cost import PAPER_PRESETS, prune_layer_index, token_ratio
from lmms_sgl.proving.grids import study_points, write_grids
from lmms_sgl.proving.points import FAMILIES, Point

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (0.64, 0.5, 0.35, 0.2, 0.09)


def reference_points(family: str, layers: int) -> list[Point]:
    """The study's rule, independently: references; per budget SGL, FastV and random at K = 1 (keep
    solved for the budget), DivPrune and VisionZip from layer 0 at the budget, PDrop at K = 1, SGL at
    K = 0; per paper preset every method that can rank there, DivPrune and VisionZip before the LM at
    the preset's layer-averaged ratio."""
    out = [Point(family, "large_only"), Point(family, "guide_only")]
    for budget in BUDGETS:
        k1 = ((1 + 0.5) / layers, (budget * layers - 1) / (layers - 1))
        out += [Point(family, m, *k1, target_ratio=budget) for m in ("sgl", "fastv", "random")]
        out += [Point(family, m, 0.0, budget, target_ratio=budget) for m in ("divprune", "visionzip")]
        out.append(Point(family, "pdrop", *k1, target_ratio=budget))
        out.append(Point(family, "sgl", 0.5 / layers, budget, target_ratio=budget, schedule="K=0"))
    for budget, (prune_layer, keep) in PAPER_PRESETS.items():
        layer_k = prune_layer_index(layers, prune_layer)
        before = token_ratio(layer_k, layers, keep)
        for method in ("sgl", "fastv", "random", "divprune", "visionzip", "pdrop"):
            if method in ("divprune", "visionzip"):
                out.append(Point(family, method, 0.0, before, target_ratio=budget, schedule="preset"))
            elif layer_k >= 1 or method not in ("fastv", "pdrop"):
                out.append(Point(family, method, prune_layer, keep, target_ratio=budget, schedule="preset"))
    return out


@pytest.mark.parametrize("layers", [12, 24, 48])
def test_study_points_are_the_studys_rule(layers):
    ours, reference = study_points("internvl", layers), reference_points("internvl", layers)
    assert [p.key for p in ours] == [p.key for p in reference]  # the cache keys, in the report's order
    for a, b in zip(ours, reference, strict=True):
        assert a.model_args(ROOT) == b.model_args(ROOT), a.key  # what each evaluation runs
        assert (a.target_ratio, a.schedule) == (pytest.approx(b.target_ratio), b.schedule)


def test_written_grids_validate_into_the_study_points(tmp_path):
    """``lmms-sgl-sweep --grid`` on the written files evaluates the study's points: the sweep's
    validation (the model's own checks, shared schedules on the checkpoint's depth) gives the same
    method, K and keep ratio as the study, point for point."""
    from lmms_sgl.proving.points import text_layers
    from lmms_sgl.sweep.grid import build

    model, large, guide = FAMILIES["internvl"]
    layers = text_layers(ROOT / large)
    path = write_grids({"internvl": layers}, tmp_path)[0]
    assert path.name == "proving-internvl.yaml"
    args = f"pretrained={ROOT / large},guide={ROOT / guide}"

    def parsed(model_args: str) -> tuple:
        values = simple_parse_args_string(model_args)
        pair = tuple(round(float(values[k]), 6) for k in ("prune_layer", "keep_ratio") if k in values)
        return values["method"], pair

    swept = [
        parsed(",".join(f"{k}={v}" for k, v in p.args.items()))
        for p in build(str(path), model, args, 1).points
    ]
    study = [parsed(p.model_args(ROOT)) for p in study_points("internvl", layers)]
    assert swept == sorted(set(swept), key=swept.index) and sorted(swept) == sorted(study)


def test_shared_schedule_errors_name_the_point(tmp_path, capsys):
    import yaml

    from lmms_sgl.sweep.cli import main

    large, guide = (ROOT / FAMILIES["internvl"][i] for i in (1, 2))
    grid = tmp_path / "grid.yaml"
    argv = ["--model", "sgl_internvl2", "--model_args", f"pretrained={large},guide={guide}"]
    argv += ["--tasks", "sgl_shapes", "--include_path", str(ROOT / "tasks")]
    argv += ["--output_path", str(tmp_path / "out"), "--grid", str(grid)]
    grid.write_text(yaml.safe_dump({"methods": ["sgl"], "ratios": [{"budget": 0.05, "layer_k": 1}]}))
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "'sgl 5 % K=1'" in error and "out of reach with K=1" in error
    grid.write_text(yaml.safe_dump({"methods": ["sgl"], "ratios": [{"budget": 0.3, "layer_k": -1}]}))
    assert main(argv) == 2
    assert "layer_k must be a layer index" in capsys.readouterr().err
    assert not (tmp_path / "out" / "points").exists()


def test_study_report_through_the_sweep_prices_and_marks_as_the_study(tmp_path):
    """The study's points written by the sweep's report code: the rows hold the study's figures, the
    real-pair FLOPs equal the study's own pricing (:func:`lmms_sgl.proving.frontier.costed`, an
    independent mapping of the schedule to the real depth) and the frontier on recorded FLOPs equals
    the study's marking."""
    import json

    from lmms_sgl.costs.operating_point import real_pair
    from lmms_sgl.proving.as_sweep import write_sweep_report
    from lmms_sgl.proving.frontier import costed, mark_frontiers

    points = [p for p in study_points("internvl", 12) if p.schedule != "preset"][:12]
    summaries = []
    for index, point in enumerate(points):
        right = 40 + 7 * index % 50
        summaries.append(
            {
                **{k: getattr(point, k) for k in point.__dataclass_fields__},
                "n": 100,
                "accuracy": right / 100,
                "stderr": 0.04,
                "token_ratio": point.keep_ratio,
                "flops_ratio": 0.3 + 0.05 * index,
                "exit_rate": 0.0,
                "scores": {str(i): float(i < right) for i in range(100)},
            }
        )
    path = write_sweep_report("internvl", summaries, ROOT, tmp_path)
    data = json.loads(path.with_suffix(".json").read_text())
    rows = data["rows"]
    assert [r["value"] for r in rows] == [s["accuracy"] for s in summaries]
    pair = real_pair("internvl")
    study = [costed(s, str(i), pair) for i, s in enumerate(summaries)]
    assert [r["real_flops_ratio"] for r in rows] == pytest.approx([c.real for c in study], rel=1e-9)
    mark_frontiers(study)
    assert [r["on_frontier"] for r in rows] == [c.on_proving for c in study]
    assert [r["on_real_frontier"] for r in rows] == [c.on_real for c in study]
    assert "## sgl_shapes (exact_match, higher is better)" in path.read_text()
    assert (path.parent / "sweep_sgl_shapes_flops.png").read_bytes()[:4] == b"\x89PNG"


def reference_unit_points(layers: int) -> list[tuple[str, str, Point]]:
    """The unit study's runs, written out: references, unit selection with both guides, token
    pruning with the one-tile guide, FastV and random at 35 % (K = 1)."""
    sees = {1: "1 tile", None: "3 tiles + thumbnail"}

    def at(method, *pair, **kwargs):
        return Point("internvl", method, *pair, task="sgl_shapes_tiles", **kwargs)

    out = [
        ("large model, 3 tiles + thumbnail", "reference", at("large_only")),
        ("large model downsampled to 1 tile", "downsampled", at("large_only", max_tiles=1)),
        ("large model downsampled to 2 tiles + thumbnail", "downsampled", at("large_only", max_tiles=2)),
        ("guide alone, 1 tile", "guide", at("guide_only", guide_max_tiles=1)),
        ("guide alone, 3 tiles + thumbnail", "guide", at("guide_only")),
    ]
    choices = {
        1: ((1, False), (1, True), (2, False), (2, True)),
        None: ((1, False), (1, True), (2, True), (3, False)),
    }
    for guide, picks in choices.items():
        for n, view in picks:
            what = (
                f"{n} tile{'s' if n > 1 else ''} + thumbnail"
                if view
                else f"best {n} of 4 (thumbnail competes)"
            )
            point = at("sgl", guide_max_tiles=guide, keep_units=n, keep_global_view=view)
            out.append((f"units: {what}, guide at {sees[guide]}", "units", point))
    for ratio, (p, k) in PAPER_PRESETS.items():
        point = at(
            "sgl", prune_layer=p, keep_ratio=k, target_ratio=ratio, schedule="preset", guide_max_tiles=1
        )
        out.append((f"SGL preset {100 * ratio:.0f} %, guide at 1 tile", "tokens", point))
    point = at("sgl", 0.5 / layers, 0.35, target_ratio=0.35, schedule="K=0", guide_max_tiles=1)
    out.append(("SGL from layer 0 at 35 %, guide at 1 tile", "tokens", point))
    k1 = (1.5 / layers, (0.35 * layers - 1) / (layers - 1))
    out += [
        (f"{name} at 35 % (K = 1)", "tokens", at(m, *k1, target_ratio=0.35))
        for m, name in (("fastv", "FastV"), ("random", "random"))
    ]
    return out


def test_unit_study_points_come_from_its_sweep_grid(tmp_path):
    from lmms_sgl.proving.unit_selection import operating_points
    from lmms_sgl.sweep.grid import build

    ours, reference = operating_points(12), reference_unit_points(12)
    assert [(o.label, o.kind) for o in ours] == [(label, kind) for label, kind, _ in reference]
    for op, (_, _, point) in zip(ours, reference, strict=True):
        assert op.point.key == point.key and op.point.model_args(ROOT) == point.model_args(ROOT), op.label
    # lmms-sgl-sweep validates the written file into the same runs (sgl_shapes_tiles, the shipped pair)
    from lmms_sgl.proving.points import text_layers

    model, large, guide = FAMILIES["internvl"]
    paths = write_grids({"internvl": text_layers(ROOT / large)}, tmp_path)
    assert [p.name for p in paths] == ["proving-internvl.yaml", "proving-internvl-units.yaml"]
    swept = build(str(paths[1]), model, f"pretrained={ROOT / large},guide={ROOT / guide}", 1).points
    expected = [simple_parse_args_string(op.point.model_args(ROOT)) for op in ours]
    for point, args in zip(swept, expected, strict=True):
        given = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in point.args.items()}
        for key, value in given.items():
            if key in ("prune_layer", "keep_ratio"):
                assert float(value) == pytest.approx(float(args[key]), abs=1e-6), point.label
            else:
                assert str(args[key]).lower() == value.lower(), (point.label, key)
        assert {k for k in args if k not in ("pretrained", "guide", "record_exit_score")} == set(given), (
            point.label
        )
