"""A sweep's grid: methods x ratios x selections x layouts, plus exit thresholds, validated up front.

A grid is a named grid (:data:`NAMED`) or a YAML file with the same keys::

    methods: [sgl, fastv, large_only, guide_only]    # method= names (lmms_sgl.method.registry)
    ratios: [0.64, 0.35, {prune_layer: 0.25, keep_ratio: 0.3}]   # presets (token_ratio=) or pairs
    # or shared schedules: every method prunes from layer K, keeping what reaches the layer-averaged
    # budget on the large model's depth (DivPrune, VisionZip: before the LM at that budget)
    # ratios: [{budget: 0.35, layer_k: 1}, {budget: 0.09, layer_k: 0}]
    selection: [topk, spread]                        # optional; applies to guided methods (sgl)
    layouts: [{}, {max_tiles: 6, guide_max_tiles: 1}]  # optional; image layouts (InternVL tiles)
    exit_thresholds: [0.9, 0.8]                      # or "deciles"; replayed from each SGL point
    units: [null, {keep_units: 2, keep_global_view: false}]  # optional; unit selection (guided methods)
    # grids: [{methods: ..., ratios: ...}, ...]       # instead of the five keys above: a union of grids
    skip_refused: false                              # true: drop points the model refuses (noted)

Methods that do not prune (``large_only``, ``guide_only``) run once per layout, ignoring ratios and
selection. Every point is checked as the SGL model checks its ``--model_args`` before loading
weights (:meth:`lmms_sgl.lmms.base.SGLModel.check_arguments`: the argument parser, the method
registry, the family's own arguments, the checkpoints' configs and the schedule), so a bad grid
fails before the first evaluation, naming the point.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from lmms_sgl.lmms.args import reject_repeated_arguments, split_model_args
from lmms_sgl.method.cost import PAPER_PRESETS, shared_schedule
from lmms_sgl.method.registry import METHODS, method_named
from lmms_sgl.method.spread import SELECTIONS
from lmms_sgl.sweep import SweepError

PRESETS = tuple(sorted(PAPER_PRESETS, reverse=True))  # 0.64, 0.35, 0.09
LAYOUT_KEYS = ("max_tiles", "guide_max_tiles", "guide_max_crops", "min_pixels", "max_pixels")
POINT_KEYS = ("methods", "ratios", "selection", "layouts", "units")
GRID_KEYS = (*POINT_KEYS, "grids", "exit_thresholds", "skip_refused")
# what the grid sets: the user's --model_args must leave these to it
RECORD_EXIT_SCORE = "record_exit_score"
GRID_ARGS = (
    "method",
    "token_ratio",
    "prune_layer",
    "keep_ratio",
    "selection",
    "exit_threshold",
    RECORD_EXIT_SCORE,
)
DECILES = "deciles"

NAMED: dict[str, dict] = {
    # the paper's main table: SGL at its three presets, FastV, and the two references
    "paper": {
        "methods": ["sgl", "fastv", "large_only", "guide_only"],
        "ratios": list(PRESETS),
        "skip_refused": True,
    },
    # the 2025 training-free baselines beside SGL at the presets
    "baselines-2025": {
        "methods": ["sgl", "divprune", "visionzip", "pdrop"],
        "ratios": list(PRESETS),
        "skip_refused": True,
    },
    # both, plus exit thresholds at the deciles of each SGL point's exit scores
    "frontier": {
        "methods": ["sgl", "fastv", "divprune", "visionzip", "pdrop", "large_only", "guide_only"],
        "ratios": list(PRESETS),
        "exit_thresholds": DECILES,
        "skip_refused": True,
    },
}


@dataclass(frozen=True)
class SweepPoint:
    """One evaluation: a method, its ratio (``token_ratio`` preset or ``prune_layer``/``keep_ratio``),
    the selection rule and image layout. ``args`` are the ``--model_args`` entries the grid adds."""

    method: str
    ratio: tuple = ()  # (("token_ratio", 0.35),) or (("prune_layer", .25), ("keep_ratio", .3)); () unpruned
    selection: str | None = None
    layout: tuple = ()  # ((name, value), ...)
    schedule: tuple = ()  # (("budget", 0.35), ("layer_k", 1)): a shared schedule, resolved into ``ratio``
    units: tuple = ()  # (("keep_units", 2), ("keep_global_view", False)): unit selection (guided methods)

    @property
    def args(self) -> dict:
        out = {"method": self.method, **dict(self.ratio)}
        if self.selection is not None:
            out["selection"] = self.selection
        chosen = dict(self.units)
        if chosen:
            out["keep_units"] = chosen["keep_units"]
            if not chosen.get("keep_global_view", True):
                out["keep_global_view"] = "false"
        return {**out, **dict(self.layout)}

    @property
    def evaluated_args(self) -> dict:
        """``args`` as evaluated: a guided point without a threshold also records the guide's exit
        score (``record_exit_score=true``), so any exit threshold, also one added to the grid later,
        is replayed from its records instead of re-running the models."""
        if self.guided and "exit_threshold" not in self.args:
            return {**self.args, RECORD_EXIT_SCORE: "true"}
        return self.args

    @property
    def ratio_label(self) -> str:
        if self.schedule:
            shared = dict(self.schedule)
            return f"{100 * shared['budget']:g} % K={shared['layer_k']}"
        ratio = dict(self.ratio)
        if "token_ratio" in ratio:
            return f"{100 * ratio['token_ratio']:g} %"
        if ratio:
            return f"K at {ratio['prune_layer']:g}, keep {ratio['keep_ratio']:g}"
        return ""

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.ratio or self.schedule:
            parts.append(self.ratio_label)
        if self.selection is not None:
            parts.append(self.selection)
        chosen = dict(self.units)
        if chosen:
            view = " + global view" if chosen.get("keep_global_view", True) else ", global view competes"
            parts.append(f"{chosen['keep_units']} unit(s){view}")
        parts += [f"{k}={v}" for k, v in self.layout]
        return " ".join(parts)

    @property
    def guided(self) -> bool:
        return method_named(self.method).guided


@dataclass
class Grid:
    name: str
    points: list[SweepPoint]
    exit_thresholds: list[float] | str = field(default_factory=list)  # floats, or "deciles"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (label, why) of refused points


def load_spec(grid: str) -> tuple[str, dict]:
    """The grid's name and keys: a named grid, or a YAML file."""
    if grid in NAMED:
        return grid, dict(NAMED[grid])
    path = Path(grid)
    if not path.is_file():
        raise SweepError(f"--grid {grid}: neither a named grid ({', '.join(NAMED)}) nor a YAML file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"--grid {grid}: not valid YAML ({error})") from None
    if not isinstance(spec, dict):
        raise SweepError(f"--grid {grid}: must be a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise SweepError(f"--grid {grid}: unknown key(s) {unknown}; allowed: {', '.join(GRID_KEYS)}")
    return path.name, spec


def _as_list(spec: dict, key: str, default: list) -> list:
    value = spec.get(key, default)
    if value is None:
        return default
    return value if isinstance(value, list) else [value]


RATIO_FORMS = (
    "a preset ({}), {{prune_layer: P, keep_ratio: R}} or a shared schedule {{budget: B, layer_k: K}}"
)


def _ratio(entry) -> tuple:
    """A ratio entry as ``--model_args`` items (a number is a ``token_ratio`` preset), or a shared
    schedule ``(("budget", B), ("layer_k", K))`` that :func:`resolve_schedules` turns into items."""
    forms = RATIO_FORMS.format(", ".join(f"{p:g}" for p in PRESETS))
    if isinstance(entry, dict):
        if set(entry) == {"budget", "layer_k"}:
            budget, layer_k = entry["budget"], entry["layer_k"]
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
                raise SweepError(f"ratio {entry!r}: budget must be a number in (0, 1]")
            if isinstance(layer_k, bool) or not isinstance(layer_k, int) or layer_k < 0:
                raise SweepError(f"ratio {entry!r}: layer_k must be a layer index (an integer >= 0)")
            return (("budget", float(budget)), ("layer_k", layer_k))
        if set(entry) != {"prune_layer", "keep_ratio"}:
            raise SweepError(f"ratio {entry!r}: give {forms}")
        return (("prune_layer", entry["prune_layer"]), ("keep_ratio", entry["keep_ratio"]))
    if isinstance(entry, bool) or not isinstance(entry, (int, float)):
        raise SweepError(f"ratio {entry!r}: give {forms}")
    return (("token_ratio", entry),)


def _units(entry) -> tuple:
    """A ``units`` entry: ``{keep_units: N, keep_global_view: bool}`` (unit selection), or ``none``."""
    if entry is None:
        return ()
    if (
        not isinstance(entry, dict)
        or "keep_units" not in entry
        or set(entry) - {"keep_units", "keep_global_view"}
    ):
        raise SweepError(
            f"units {entry!r}: give {{keep_units: N}} (and keep_global_view: true/false), or none"
        )
    count, view = entry["keep_units"], entry.get("keep_global_view", True)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SweepError(f"units {entry!r}: keep_units must be a whole number >= 1")
    if not isinstance(view, bool):
        raise SweepError(f"units {entry!r}: keep_global_view must be true or false")
    return (("keep_units", count), ("keep_global_view", view))


def expand(spec: dict) -> list[SweepPoint]:
    """Every point of the grid, in order: methods, then ratios, selections, layouts; a grid with
    ``grids`` (a list of mappings of methods, ratios, selection, layouts) is their union, in order."""
    if "grids" in spec:
        subs = spec["grids"]
        if set(spec) & set(POINT_KEYS) or not isinstance(subs, list) or not subs:
            raise SweepError(
                "grids: give a non-empty list of mappings, each with its own methods and ratios (and no "
                "methods, ratios, selection or layouts beside it)"
            )
        out = []
        for index, sub in enumerate(subs):
            unknown = sorted(set(sub) - set(POINT_KEYS)) if isinstance(sub, dict) else None
            if unknown is None or unknown:
                raise SweepError(f"grids[{index}]: a mapping with keys among {', '.join(POINT_KEYS)}")
            out += expand(sub)
        return list(dict.fromkeys(out))
    methods = _as_list(spec, "methods", [])
    if not methods:
        raise SweepError(f"the grid has no methods; allowed: {', '.join(METHODS)}")
    for name in methods:
        if name not in METHODS:
            raise SweepError(f"method {name!r} in the grid is not one of {', '.join(METHODS)}")
    ratios = [_ratio(r) for r in _as_list(spec, "ratios", [])]
    selections = _as_list(spec, "selection", [None])
    for selection in selections:
        if selection is not None and selection not in SELECTIONS:
            raise SweepError(f"selection {selection!r} in the grid is not one of {', '.join(SELECTIONS)}")
    units = [_units(u) for u in _as_list(spec, "units", [None])]
    layouts = []
    for layout in _as_list(spec, "layouts", [{}]):
        if not isinstance(layout, dict) or set(layout) - set(LAYOUT_KEYS):
            raise SweepError(f"layout {layout!r}: a mapping with keys among {', '.join(LAYOUT_KEYS)}")
        layouts.append(tuple(layout.items()))
    out: list[SweepPoint] = []
    for name in methods:
        method = method_named(name)
        for layout in layouts:
            own = (
                layout if method.uses_guide else tuple(kv for kv in layout if not kv[0].startswith("guide_"))
            )
            if not method.prunes:
                out.append(SweepPoint(name, layout=own))
                continue
            chosen_units = units if method.guided else [()]
            if not ratios and (not method.guided or () in chosen_units):
                raise SweepError(
                    f"method {name!r} prunes: the grid needs ratios (e.g. {list(PRESETS)}), or units for "
                    "unit selection alone"
                )
            for ratio in ratios or [()]:
                shared = ratio if ratio and ratio[0][0] == "budget" else ()
                for selection in selections if method.guided else [None]:
                    for unit in chosen_units:
                        out.append(SweepPoint(name, () if shared else ratio, selection, own, shared, unit))
    unique = list(dict.fromkeys(out))  # layouts differing only in the guide's collapse for large_only
    return unique


def exit_thresholds(spec: dict) -> list[float] | str:
    value = spec.get("exit_thresholds") or []
    if value == DECILES:
        return DECILES
    out = []
    for t in value if isinstance(value, list) else [value]:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise SweepError(
                f"exit threshold {t!r}: must be a number in [0, 1] (or exit_thresholds: deciles)"
            )
        out.append(float(t))
    return out


def check_point(model: str, model_args: str, batch_size: int) -> int:
    """What the SGL model checks before it loads weights (raises ``ValueError`` and friends);
    returns the large model's decoder layers, read from its config."""
    from lmms_eval.utils import simple_parse_args_string

    from lmms_sgl.lmms.registry import MODELS

    reject_repeated_arguments(model_args)
    module, _, name = MODELS[model].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    instance = cls.__new__(cls)  # __init__ would load the weights
    return instance.check_arguments({**simple_parse_args_string(model_args), "batch_size": batch_size})


def point_model_args(base: str, point: SweepPoint, evaluated: bool = False) -> str:
    """The user's ``--model_args`` followed by the point's own entries: those a user runs the point
    with, or (``evaluated``) those the sweep evaluates it with (:attr:`SweepPoint.evaluated_args`)."""
    args = point.evaluated_args if evaluated else point.args
    return ",".join([*split_model_args(base), *(f"{k}={v}" for k, v in args.items())])


def resolve_schedules(points: list[SweepPoint], num_layers: int) -> list[SweepPoint]:
    """Shared schedules as ``prune_layer`` / ``keep_ratio`` on a large model of ``num_layers``
    (:func:`lmms_sgl.method.cost.shared_schedule`). Methods that prune before the language model by
    default (DivPrune, VisionZip: their authors' setting) keep the budget from layer 0 instead, as
    the proving study runs them."""
    out = []
    for point in points:
        if not point.schedule:
            out.append(point)
            continue
        shared = dict(point.schedule)
        if method_named(point.method).zero_by_default:
            pair = (0.0, shared["budget"])
        else:
            try:
                pair = shared_schedule(shared["budget"], num_layers, shared["layer_k"])
            except ValueError as error:
                raise SweepError(f"grid point {point.label!r}: {error}") from None
        out.append(replace(point, ratio=(("prune_layer", pair[0]), ("keep_ratio", pair[1]))))
    return out


def large_layers(model: str, model_args: str, batch_size: int) -> int:
    """The large model's decoder layers, read from its config as the model's own checks do (the
    shared arguments checked as a ``large_only`` point; the grid sets ``method``)."""
    return check_point(model, ",".join([*split_model_args(model_args), "method=large_only"]), batch_size)


def build(grid: str, model: str, model_args: str, batch_size: int) -> Grid:
    """The validated grid; raises :class:`SweepError` naming the first bad point."""
    from lmms_sgl.lmms.registry import MODELS

    if model not in MODELS:
        raise SweepError(f"--model {model}: not one of {', '.join(MODELS)}")
    name, spec = load_spec(grid)
    given = {p.partition("=")[0].strip() for p in split_model_args(model_args)}
    clash = sorted(given & set(GRID_ARGS))
    if clash:
        raise SweepError(
            f"--model_args sets {clash}, which the grid sets per point; remove them "
            "(give the pair and shared arguments only: pretrained, guide, device, ...)"
        )
    points = expand(spec)
    if any(p.schedule for p in points):
        try:
            layers = large_layers(model, model_args, batch_size)
        except (ValueError, TypeError, OSError) as error:
            raise SweepError(f"--model_args {model_args!r}: {error}") from None
        points = resolve_schedules(points, layers)
    clash = sorted(given & {k for p in points for k, _ in p.layout})
    if clash:
        raise SweepError(f"--model_args sets {clash}, which the grid's layouts set per point; remove them")
    thresholds = exit_thresholds(spec)
    skip = bool(spec.get("skip_refused", False))
    kept, skipped = [], []
    for point in points:
        try:
            check_point(model, point_model_args(model_args, point, evaluated=True), batch_size)
        except (ValueError, TypeError, OSError) as error:  # the model's own refusals (CheckpointError too)
            if skip:
                skipped.append((point.label, str(error)))
                continue
            raise SweepError(
                f"grid point {point.label!r} ({', '.join(f'{k}={v}' for k, v in point.args.items())}) "
                f"is refused by --model {model}: {error}"
            ) from None
        kept.append(point)
    if not kept:
        raise SweepError("every point of the grid is refused: " + "; ".join(f"{p}: {w}" for p, w in skipped))
    if thresholds and not any(p.guided and "exit_threshold" not in p.args for p in kept):
        raise SweepError(
            "exit_thresholds are replayed from a guided point's records (method sgl); the grid has none"
        )
    return Grid(name, kept, thresholds, skipped)
