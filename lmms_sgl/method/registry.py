"""Pruning methods by name: what each one needs, and how it arms the large model's pruner.

A method is one small object (a :class:`KeepMethod`) registered under its ``method=`` name. It
declares what it needs (a guide, the large model's own attention at layer K-1, the vision tower's
attention, K = 0 only or K >= 1) and, per batch, installs its pruner and arms it with its keep plan.
Settings validation, model loading, the pipeline and the reports ask the method, never its name:
adding a method touches its own module and :data:`BUILTIN` here, nothing else.

The modules are imported on first look-up: they import this one (to subclass and register), so
this one cannot import them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lmms_sgl.method.cost import TransformerShape
from lmms_sgl.method.pruning import PlanSource, VisualTokenPruner
from lmms_sgl.method.selection import KeepPlan, keep_count, plan_from_scores

if TYPE_CHECKING:
    from lmms_sgl.method.settings import SGLSettings

# name -> module that registers it (in the order docs/arguments.md and errors list them)
BUILTIN = {
    "sgl": "lmms_sgl.method.sgl",
    "fastv": "lmms_sgl.baselines.fastv",
    "random": "lmms_sgl.baselines.random_tokens",
    "divprune": "lmms_sgl.baselines.divprune",
    "visionzip": "lmms_sgl.baselines.visionzip",
    "pdrop": "lmms_sgl.baselines.pdrop",
    "large_only": "lmms_sgl.method.registry",
    "guide_only": "lmms_sgl.method.registry",
}
METHODS = tuple(BUILTIN)

# Which layers a method can prune from: any K; K = 0 only; K >= 1 (it ranks at layer K-1); K = 0 by
# default (its authors' setting) and any K on request.
ANY_LAYER, BEFORE_LM, AFTER_FIRST, FROM_ZERO = "any", "before_lm", "after_first", "from_zero"


@dataclass
class PlanBatch:
    """One batch as a method sees it when arming the large model.

    Attributes:
        large: the large :class:`~lmms_sgl.families.base.LoadedVLM`.
        settings: the run's settings.
        layer_k: the layer from which tokens are dropped.
        pruner: what :meth:`KeepMethod.make_pruner` built, to install and arm.
        samples, records: the batch's samples and their records (fallbacks, layout notes).
        inputs: the processor's batch; ``visual`` ``[B, P]`` its visual positions.
        scores: the guide's :class:`~lmms_sgl.pipeline.records.GuideScores` per sample (``None``:
            keep every token), for methods that read a guide.
        query_rows: ``[B, P]`` bool, one row each: the query of methods that rank by one row of
            attention (default the last prompt token; log-likelihood: the last context token).
        units: per sample, the visual units of the layout (or why they are unknown), when the
            planner needs them (unit skipping or unit selection).
    """

    large: Any
    settings: SGLSettings
    layer_k: int
    pruner: Any
    samples: Sequence[Any]
    records: Sequence[Any]
    inputs: dict
    visual: torch.Tensor
    scores: Sequence[Any] | None = None
    query_rows: torch.Tensor | None = None
    units: Sequence[Any] | None = None

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]


@dataclass
class MethodRun:
    """What a method armed for one batch. After the forward, :attr:`read_stages` says what each
    sample's layers saw and :attr:`selection_flops` what choosing its tokens cost beyond the forward.

    Attributes:
        first_plan: the plan at the first pruned layer when it is known before the vision tower runs
            (then unit skipping can encode only the units it reads); ``None`` otherwise.
        read_stages: after the forward, per sample ``[(layer, kept visual tokens), ...]``.
        selection_flops: ``(sample, prompt length, visual tokens, its stages) -> FLOPs`` of the
            selection beyond the forward itself (recorded rows, Gram matrices, light attention).
    """

    read_stages: Callable[[], list[list[tuple[int, int]]]]
    first_plan: KeepPlan | None = None
    selection_flops: Callable[[int, int, int, list], float] = field(default=lambda *_: 0.0)


class KeepMethod:
    """One ``method=`` value: its declarations and its keep plan. Subclasses override what differs."""

    name: ClassVar[str]
    prunes: ClassVar[bool] = True  # False: the large model runs unpruned (or not at all)
    guided: ClassVar[bool] = False  # ranks by the guide's importance (so exit and keep_units apply)
    answers_with_guide: ClassVar[bool] = False  # every answer is the guide's (``guide_only``)
    drafts: ClassVar[bool] = False  # the guide may draft for the large model (``draft=guide``)
    own_attention: ClassVar[bool] = False  # records the large model's attention (recording SDPA)
    vision_attention: ClassVar[bool] = False  # records the vision tower's attention
    layers: ClassVar[str] = ANY_LAYER
    plan_before_tower: ClassVar[bool] = False  # plan known before the vision tower: unit skipping

    @property
    def zero_by_default(self) -> bool:
        """Prunes before the language model unless told otherwise (``prune_layer`` defaults to 0, a
        ``token_ratio`` preset means that ratio from layer 0)."""
        return self.layers in (BEFORE_LM, FROM_ZERO)

    @property
    def uses_guide(self) -> bool:
        """The guide runs for this method (its importance, or its answer)."""
        return self.guided or self.answers_with_guide

    def check_layer(self, layer_k: int, num_layers: int, prune_layer: float) -> None:
        """Refuse a K this method cannot prune from (before loading)."""
        if self.layers == AFTER_FIRST and layer_k < 1:
            raise ValueError(
                f"method={self.name!r} ranks at layer K-1 and needs K >= 1; "
                f"prune_layer={prune_layer} gives K=0 for {num_layers} layers"
            )

    def check_checkpoint(self, family, path: str, argument: str) -> None:
        """Refuse a checkpoint this method is not defined for (before loading)."""

    def make_pruner(self, large, settings: SGLSettings, layer_k: int):
        return VisualTokenPruner(large.text_model, layer_k)

    def arm(self, batch: PlanBatch, stack: ExitStack) -> MethodRun:
        """Install ``batch.pruner`` (and any recorder or hook) on ``stack`` and arm it."""
        raise NotImplementedError

    def planned_stages(
        self, num_layers: int, layer_k: int, n_visual: int, keep_ratio: float
    ) -> list[tuple[int, int]]:
        """``[(layer, kept visual tokens), ...]`` this method gives ``n_visual`` tokens at (K, r),
        known without running it: the analytic price of an operating point on another pair
        (:mod:`lmms_sgl.costs.operating_point`). One stage of ``keep_count`` tokens by default."""
        return [(layer_k, keep_count(n_visual, keep_ratio))]

    def planned_selection_flops(self, shape: TransformerShape, prompt: int, n_visual: int, stages) -> float:
        """The selection's own work beyond the forward (as :attr:`MethodRun.selection_flops` counts
        it at run time) for a language model of ``shape``; none by default."""
        return 0.0


class ScoredMethod(KeepMethod):
    """Methods that give every visual token a score before the language model runs and keep the top
    ``keep_ratio`` from layer K on (SGL, random): one pruner, a plan known before the vision tower."""

    plan_before_tower = True

    def plan_source(self, batch: PlanBatch) -> PlanSource | list[KeepPlan]:
        """The plan (or, for staged pruners, one plan per stage over the original prompt)."""
        scores = self.token_scores(batch)
        return plan_from_scores(scores, batch.visual, batch.attention_mask, batch.settings.keep_ratio)

    def token_scores(self, batch: PlanBatch) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def arm(self, batch: PlanBatch, stack: ExitStack) -> MethodRun:
        source = self.plan_source(batch)
        stack.enter_context(batch.pruner.installed())
        batch.pruner.arm(source)
        first = source[0] if isinstance(source, list) else source
        return MethodRun(single_stage_reader(batch), first if isinstance(first, KeepPlan) else None)


def single_stage_reader(batch: PlanBatch) -> Callable[[], list[list[tuple[int, int]]]]:
    """Per sample ``[(K, kept)]`` from a single pruner, or each stage of a staged one."""

    def read() -> list[list[tuple[int, int]]]:
        pruner = batch.pruner
        plan = pruner.plan
        if plan is None:
            return []
        if hasattr(pruner, "stages"):
            return [pruner.stages(b) for b in range(batch.visual.shape[0])]
        return [[(batch.layer_k, kept)] for kept in plan.kept_visual]

    return read


class LargeOnly(KeepMethod):
    name = "large_only"
    prunes = False
    drafts = True


class GuideOnly(KeepMethod):
    name = "guide_only"
    prunes = False
    answers_with_guide = True


_REGISTRY: dict[str, KeepMethod] = {}


def register(method: type[KeepMethod]) -> type[KeepMethod]:
    """Class decorator: make ``method`` available as ``method=<its name>``."""
    if method.name not in BUILTIN:
        raise ValueError(f"method {method.name!r} is not listed in lmms_sgl.method.registry.BUILTIN")
    _REGISTRY[method.name] = method()
    return method


register(LargeOnly)
register(GuideOnly)


def method_named(name: str) -> KeepMethod:
    """The registered method ``name``; an unknown name is an error that lists the valid ones."""
    if name not in BUILTIN:
        raise ValueError(f"method={name!r} is not one of {METHODS}")
    if name not in _REGISTRY:
        importlib.import_module(BUILTIN[name])
    return _REGISTRY[name]


def methods_where(predicate: Callable[[KeepMethod], bool]) -> tuple[str, ...]:
    """Names of the registered methods for which ``predicate`` holds, in :data:`METHODS` order."""
    return tuple(name for name in METHODS if predicate(method_named(name)))
