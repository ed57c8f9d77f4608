"""The proving study's grids, written as ``lmms-sgl-sweep`` grids and expanded by the sweep's code.

The main comparison is three sweep grids per large model (their numbers depend only on its depth):

* ``shared``: the references and every method on one shared schedule per budget (K = 1, the keep
  ratio solved for the budget: methods differ only in which tokens they keep; DivPrune and
  VisionZip prune before the language model at the budget, their authors' setting);
* ``from_zero``: SGL pruning from layer 0 (only a guide can rank there);
* ``presets``: the paper's ``(prune_layer, keep_ratio)`` presets for every method that can rank at
  their K (FastV and PDrop need K >= 1), DivPrune and VisionZip at each preset's layer-averaged ratio.

:func:`study_points` expands them with :func:`lmms_sgl.sweep.grid.expand` and
:func:`lmms_sgl.sweep.grid.resolve_schedules`, the functions ``lmms-sgl-sweep --grid FILE`` uses,
and names each point as the study's cache knows it (:class:`lmms_sgl.proving.points.Point`).
:func:`write_grids` writes them as YAML, so the same comparison runs on any task with
``lmms-sgl-sweep --grid configs/sweeps/proving-<family>.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lmms_sgl.method.cost import PAPER_PRESETS, prune_layer_index, token_ratio
from lmms_sgl.method.registry import method_named
from lmms_sgl.proving.points import Point
from lmms_sgl.sweep.grid import SweepPoint, expand, resolve_schedules

TARGET_RATIOS = (0.64, 0.5, 0.35, 0.2, 0.09)
PRUNING_METHODS = ("sgl", "fastv", "random")
# The 2025 training-free methods beside them: DivPrune and VisionZip prune before the language model
# (K = 0, keep ratio = the target ratio), PDrop in stages from the schedule's K.
BASELINES_2025 = ("divprune", "visionzip", "pdrop")
REFERENCES = ("large_only", "guide_only")


def study_grids(num_layers: int) -> dict[str, dict]:
    """The study's sweep grids for a large model of ``num_layers`` decoder layers."""
    presets = sorted(PAPER_PRESETS.items(), reverse=True)
    ranked = [(p, k) for _, (p, k) in presets if prune_layer_index(num_layers, p) >= 1]
    grids = {
        "shared": {
            "methods": [*REFERENCES, *PRUNING_METHODS, *BASELINES_2025],
            "ratios": [{"budget": r, "layer_k": 1} for r in TARGET_RATIOS],
            "selection": ["topk"],
        },
        "from_zero": {
            "methods": ["sgl"],
            "ratios": [{"budget": r, "layer_k": 0} for r in TARGET_RATIOS],
            "selection": ["topk"],
        },
        "presets": {
            "methods": ["sgl", "random"],
            "ratios": [{"prune_layer": p, "keep_ratio": k} for _, (p, k) in presets],
            "selection": ["topk"],
        },
        "presets_ranked": {  # FastV and PDrop rank at layer K-1: presets with K >= 1 only
            "methods": ["fastv", "pdrop"],
            "ratios": [{"prune_layer": p, "keep_ratio": k} for p, k in ranked],
        },
        "presets_before": {  # the presets' layer-averaged ratios, before the language model
            "methods": ["divprune", "visionzip"],
            "ratios": [
                {"budget": token_ratio(prune_layer_index(num_layers, p), num_layers, k), "layer_k": 0}
                for _, (p, k) in presets
            ],
        },
    }
    if not ranked:  # a model too shallow for K >= 1 at any preset
        del grids["presets_ranked"]
    return grids


def _study_point(family: str, point: SweepPoint, target: float | None, schedule_name: str) -> Point:
    ratio = dict(point.ratio)
    selection = point.selection or "topk"
    if not ratio:
        return Point(family, point.method)
    return Point(
        family,
        point.method,
        ratio["prune_layer"],
        ratio["keep_ratio"],
        target_ratio=target,
        schedule=schedule_name,
        selection=selection if method_named(point.method).guided else "topk",
    )


METHOD_ORDER = (*PRUNING_METHODS, *BASELINES_2025)
PRESET_ORDER = tuple(sorted(PAPER_PRESETS, reverse=True))


def report_order(point: Point) -> tuple:
    """The report's order: references; per budget the shared schedule's methods, then SGL from
    layer 0; then per preset every method."""
    if point.prune_layer is None:
        return (0, REFERENCES.index(point.method))
    if point.schedule == "preset":
        return (2, PRESET_ORDER.index(point.target_ratio), METHOD_ORDER.index(point.method))
    return (
        1,
        TARGET_RATIOS.index(point.target_ratio),
        point.schedule == "K=0",
        METHOD_ORDER.index(point.method),
    )


def study_points(family: str, num_layers: int) -> list[Point]:
    """The study's points: its grids expanded by the sweep's code, in the report's order."""
    preset_of_budget = {
        round(token_ratio(prune_layer_index(num_layers, p), num_layers, k), 9): r
        for r, (p, k) in PAPER_PRESETS.items()
    }
    preset_of_pair = {pair: r for r, pair in PAPER_PRESETS.items()}
    out: list[Point] = []
    for name, spec in study_grids(num_layers).items():
        for point in resolve_schedules(expand(spec), num_layers):
            budget = dict(point.schedule).get("budget")
            if name in ("shared", "from_zero"):
                target, schedule_name = budget, "K=1" if name == "shared" else "K=0"
            elif name == "presets_before":
                target, schedule_name = preset_of_budget[round(budget, 9)], "preset"
            else:
                ratio = dict(point.ratio)
                target, schedule_name = preset_of_pair[(ratio["prune_layer"], ratio["keep_ratio"])], "preset"
            out.append(_study_point(family, point, target, schedule_name))
    return sorted(out, key=report_order)


# The unit study's unit choices per guide layout (``guide_max_tiles``: None is the full layout):
# (N, keep the thumbnail); 3 tiles + thumbnail would be everything.
UNIT_CHOICES = {
    1: ((1, False), (1, True), (2, False), (2, True)),
    None: ((1, False), (1, True), (2, True), (3, False)),
}


def unit_grids() -> list[dict]:
    """The unit study's grids (``sgl_shapes_tiles``, InternVL): the large model at its full layout
    and downsampled, the guide alone at one tile and at the full layout, unit selection with either
    guide, token pruning with the one-tile guide (the paper's presets, SGL from layer 0 at 35 %) and
    FastV and random at 35 % on the shared schedule."""

    def units(guide_tiles):
        return [{"keep_units": n, "keep_global_view": view} for n, view in UNIT_CHOICES[guide_tiles]]

    one_tile = [{"guide_max_tiles": 1}]
    presets = sorted(PAPER_PRESETS.items(), reverse=True)
    return [
        {"methods": ["large_only"], "layouts": [{}, {"max_tiles": 1}, {"max_tiles": 2}]},
        {"methods": ["guide_only"], "layouts": [*one_tile, {}]},
        {"methods": ["sgl"], "selection": ["topk"], "layouts": one_tile, "units": units(1)},
        {"methods": ["sgl"], "selection": ["topk"], "units": units(None)},
        {
            "methods": ["sgl"],
            "selection": ["topk"],
            "layouts": one_tile,
            "ratios": [
                *({"prune_layer": p, "keep_ratio": k} for _, (p, k) in presets),
                {"budget": 0.35, "layer_k": 0},
            ],
        },
        {"methods": ["fastv", "random"], "ratios": [{"budget": 0.35, "layer_k": 1}]},
    ]


def unit_sweep_points(num_layers: int) -> list[SweepPoint]:
    """The unit study's points, expanded and resolved by the sweep's code, in the report's order."""
    return resolve_schedules(expand({"grids": unit_grids()}), num_layers)


def write_grids(num_layers: dict[str, int], out_dir: Path) -> list[Path]:
    """``proving-<family>.yaml``: one sweep grid per family (its large model's depth), the union of
    :func:`study_grids` (its ``grids`` key); ``proving-internvl-units.yaml``: :func:`unit_grids`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for family, layers in num_layers.items():
        path = out_dir / f"proving-{family}.yaml"
        header = (
            f"# The proving study's comparison for the {family} pair ({layers} decoder layers), as one\n"
            "# lmms-sgl-sweep grid (--tasks sgl_shapes); written by `python -m lmms_sgl.proving.grids`.\n"
        )
        path.write_text(
            header + yaml.safe_dump({"grids": list(study_grids(layers).values())}, sort_keys=False)
        )
        written.append(path)
    if "internvl" in num_layers:
        path = out_dir / "proving-internvl-units.yaml"
        header = (
            "# The unit study's points (InternVL pair, --tasks sgl_shapes_tiles), as one lmms-sgl-sweep\n"
            "# grid; written by `python -m lmms_sgl.proving.grids`.\n"
        )
        path.write_text(header + yaml.safe_dump({"grids": unit_grids()}, sort_keys=False))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """Write the study's grids for the shipped proving pairs (their depths read from ``models/``)."""
    import argparse

    from lmms_sgl.proving.points import FAMILIES, text_layers

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository (models/ inside)")
    parser.add_argument("--out", type=Path, default=Path("configs/sweeps"))
    args = parser.parse_args(argv)
    depths = {family: text_layers(args.root / large) for family, (_, large, _) in FAMILIES.items()}
    for path in write_grids(depths, args.out):
        print(path)


if __name__ == "__main__":
    main()
