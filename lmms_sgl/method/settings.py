"""SGL knobs, validated up front so that a bad value fails before any weights load."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmms_sgl.method import registry
from lmms_sgl.method.cost import PAPER_PRESETS, prune_layer_index, token_ratio
from lmms_sgl.method.importance import PRECISIONS
from lmms_sgl.method.registry import KeepMethod, method_named
from lmms_sgl.method.spread import DEFAULT_RADIUS, SELECTIONS, resolve_selection

DRAFT_SOURCES = ("guide",)  # who drafts for the large model's speculative decoding


def _check_range(name: str, value: float, low: float, high: float, low_open: bool, high_open: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name}={value!r} must be a number")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is outside the allowed range {interval}")


@dataclass(frozen=True)
class SGLSettings:
    """What the large model keeps and when the guide's answer is final.

    Attributes:
        method: ``sgl`` (guide-ranked pruning + optional exit), ``fastv`` (the large model's own
            last-token attention at layer K-1), ``random`` (seeded), ``divprune`` / ``visionzip``
            (before the language model, K = 0), ``pdrop`` (progressive drops from layer K on),
            ``large_only`` (no pruning, no guide) or ``guide_only`` (always the guide's answer);
            each is an object of :mod:`lmms_sgl.method.registry` (baselines in
            :mod:`lmms_sgl.baselines`).
        prune_layer: K = int(L * prune_layer), in [0, 1); 0 for methods that prune before the
            language model.
        keep_ratio: fraction of visual tokens kept from layer K on, in (0, 1] (for ``pdrop`` the
            average over layers >= K of its stages' fractions).
        exit_threshold: exit when (confidence + consistency) / 2 >= threshold, in [0, 1];
            ``None`` never exits.
        consistency_ratio: visual tokens kept in the consistency pass, in (0, 1].
        record_exit_score: compute and record the exit score (the guide's consistency pass) even
            without ``exit_threshold``, for a run that ``lmms-sgl-calibrate`` replays. Without it a
            run with no threshold skips the pass (nothing would read it) and records no score.
        seed: seed of the ``random`` baseline.
        importance_precision: ``fp32`` (default: fp32 probabilities summed in fp32) or ``model``
            (the official arithmetic: eager probabilities in the model dtype, summed in it per forward,
            then across forwards; reproduces the official rankings on bf16, where near-ties round
            differently).
        skip_units: when the large model drops tokens before its first layer (K = 0, or unit
            selection), its vision tower encodes only the units a kept token reads (exact).
        keep_units: unit selection: keep every token of the N units (tiles, crops, images) with
            the largest guide importance mass from layer 0 on (``sgl`` only); from layer K on
            (``prune_layer``) only the top ``keep_ratio`` of those tokens by the same importance
            (two stages when K > 0). ``None``: token selection.
        keep_global_view: with ``keep_units``, the thumbnail / base image is kept besides the N.
        selection: how the guide's importance chooses tokens: ``topk`` (the paper's rule),
            ``spread`` (the most important tokens spread over the image, :mod:`.spread`) or
            ``auto``: spread when pruning from layer 0 or keeping at most ``AUTO_SPREAD_MAX_KEEP``,
            top-k otherwise (chosen on the validation split; :meth:`token_selection` resolves it).
        spread_radius: spreading: neighbours within this many cells are suppressed (shrinking to
            0, top-k, when the budget cannot be filled otherwise).
    """

    method: str = "sgl"
    prune_layer: float = 0.2
    keep_ratio: float = 0.2
    exit_threshold: float | None = None
    consistency_ratio: float = 0.05
    record_exit_score: bool = False
    seed: int = 0
    importance_precision: str = "fp32"
    skip_units: bool = True
    keep_units: int | None = None
    keep_global_view: bool = True
    draft: str | None = None
    draft_tokens: int = 4
    selection: str = "auto"
    spread_radius: int = DEFAULT_RADIUS

    def __post_init__(self) -> None:
        method = method_named(self.method)  # an unknown name lists the valid ones
        if self.importance_precision not in PRECISIONS:
            raise ValueError(f"importance_precision={self.importance_precision!r} is not one of {PRECISIONS}")
        _check_range("prune_layer", self.prune_layer, 0.0, 1.0, low_open=False, high_open=True)
        _check_range("keep_ratio", self.keep_ratio, 0.0, 1.0, low_open=True, high_open=False)
        _check_range("consistency_ratio", self.consistency_ratio, 0.0, 1.0, low_open=True, high_open=False)
        if self.keep_units is not None:
            if (
                isinstance(self.keep_units, bool)
                or not isinstance(self.keep_units, int)
                or self.keep_units < 1
            ):
                raise ValueError(f"keep_units={self.keep_units!r} must be a whole number >= 1")
            if not method.guided:
                raise ValueError(
                    f"keep_units={self.keep_units} ranks units by the guide's importance; "
                    f"method={self.method!r} has none (allowed with {_named(_guided())})"
                )
        if self.draft is not None:
            if self.draft not in DRAFT_SOURCES:
                raise ValueError(f"draft={self.draft!r} is not one of {DRAFT_SOURCES} (or None)")
            if not method.drafts:
                drafting = registry.methods_where(lambda m: m.drafts)
                raise ValueError(f"draft={self.draft!r} applies to method in {drafting}, got {self.method!r}")
            if self.keep_units is not None:
                raise ValueError(
                    f"draft={self.draft!r} verifies drafts on a single keep plan; keep_units="
                    f"{self.keep_units} prunes in stages (drop keep_units or draft)"
                )
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not one of {SELECTIONS}")
        if self.selection == "spread" and not method.guided:
            raise ValueError(
                f"selection={self.selection!r} spreads the guide's importance; method={self.method!r} "
                f"has none (allowed with {_named(_guided())})"
            )
        if (
            isinstance(self.spread_radius, bool)
            or not isinstance(self.spread_radius, int)
            or self.spread_radius < 0
        ):
            raise ValueError(f"spread_radius={self.spread_radius!r} must be a whole number >= 0")
        if (
            isinstance(self.draft_tokens, bool)
            or not isinstance(self.draft_tokens, int)
            or self.draft_tokens < 1
        ):
            raise ValueError(f"draft_tokens={self.draft_tokens!r} must be a whole number >= 1")
        if self.exit_threshold is not None:
            _check_range("exit_threshold", self.exit_threshold, 0.0, 1.0, low_open=False, high_open=False)
            if not method.guided:
                raise ValueError(
                    f"exit_threshold applies to {_named(_guided())} only, got method={self.method!r}"
                )
        if not isinstance(self.record_exit_score, bool):
            raise ValueError(f"record_exit_score={self.record_exit_score!r} must be true or false")
        if self.record_exit_score and not method.guided:
            raise ValueError(
                f"record_exit_score=true records the guide's exit score; it applies to "
                f"{_named(_guided())} only, got method={self.method!r}"
            )
        if method.layers == registry.BEFORE_LM and self.prune_layer != 0:
            raise ValueError(
                f"method={self.method!r} prunes before the language model (K = 0); "
                f"prune_layer={self.prune_layer!r} is not allowed (omit it or give 0)"
            )

    @staticmethod
    def preset(token_ratio_preset: float) -> tuple[float, float]:
        """``(prune_layer, keep_ratio)`` of a paper preset; other values are refused naming the
        presets and the way to get any other ratio."""
        for preset, schedule in PAPER_PRESETS.items():
            if math.isclose(token_ratio_preset, preset):
                return schedule
        presets = ", ".join(
            f"{p:g} (prune_layer={k:g}, keep_ratio={r:g})" for p, (k, r) in sorted(PAPER_PRESETS.items())
        )
        raise ValueError(
            f"token_ratio={token_ratio_preset!r} is not a preset; allowed: {sorted(PAPER_PRESETS)}, the "
            f"paper's settings: {presets}. For another ratio give prune_layer and keep_ratio instead "
            "of token_ratio"
        )

    @classmethod
    def from_token_ratio(cls, token_ratio_preset: float, **kwargs) -> SGLSettings:
        """The paper's presets: 0.64 / 0.35 / 0.09 -> (prune_layer, keep_ratio) (0.4, 0.4) / (0.2, 0.2) /
        (0.05, 0.05)."""
        prune_layer, keep_ratio = cls.preset(token_ratio_preset)
        if method_named(kwargs.get("method", "sgl")).zero_by_default:  # K = 0: the ratio itself
            return cls(prune_layer=0.0, keep_ratio=token_ratio_preset, **kwargs)
        return cls(prune_layer=prune_layer, keep_ratio=keep_ratio, **kwargs)

    @property
    def keep_method(self) -> KeepMethod:
        """The registered method object (:mod:`lmms_sgl.method.registry`)."""
        return method_named(self.method)

    def token_selection(self, layer_k: int) -> str:
        """``topk`` or ``spread``: the selection rule from layer ``layer_k`` (``auto`` resolved)."""
        return resolve_selection(self.selection, self.keep_ratio, layer_k)

    @property
    def prunes(self) -> bool:
        return self.keep_method.prunes

    @property
    def uses_guide(self) -> bool:
        return self.keep_method.uses_guide

    @property
    def scores_exit(self) -> bool:
        """The guide's consistency pass and exit score run: something reads them (an exit threshold,
        or a run recorded for calibration)."""
        return self.exit_threshold is not None or self.record_exit_score

    def skips_units(self, num_layers: int) -> bool:
        """Whether the large model's unkept tokens never reach its first layer, so unit skipping
        is exact (a plan known before the vision tower runs: not FastV's)."""
        return (
            self.skip_units
            and self.keep_method.plan_before_tower
            and (self.keep_units is not None or self.layer_k(num_layers) == 0)
        )

    @property
    def needs_guide(self) -> bool:
        """A guide is loaded: for SGL's guidance, or only to draft (``large_only`` + ``draft``)."""
        return self.uses_guide or self.draft is not None

    def layer_k(self, num_layers: int) -> int:
        k = prune_layer_index(num_layers, self.prune_layer)
        self.keep_method.check_layer(k, num_layers, self.prune_layer)
        return k

    def expected_token_ratio(self, num_layers: int) -> float:
        """The layer-averaged ratio these settings aim at (PDrop's stages average to the same)."""
        if not self.prunes:
            return 1.0
        return token_ratio(self.layer_k(num_layers), num_layers, self.keep_ratio)


def _guided() -> tuple[str, ...]:
    return registry.methods_where(lambda m: m.guided)


def _named(names: tuple[str, ...]) -> str:
    """``method='sgl'`` for one name, ``method in (...)`` for several."""
    return f"method={names[0]!r}" if len(names) == 1 else f"method in {names}"
