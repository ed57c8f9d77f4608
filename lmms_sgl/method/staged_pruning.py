"""Several pruners stacked at increasing layers, each dropping from what the previous one left.

:class:`StagedPruner` installs one :class:`~lmms_sgl.method.pruning.VisualTokenPruner` per layer
(earlier stages first, so their hooks run first and later stages see the sequence they left),
composes their plans back onto the original prompt (:func:`lmms_sgl.method.stages.compose`) and
reports the per-stage counts. PDrop (:mod:`lmms_sgl.baselines.pdrop`) computes each stage's plan
when its layer starts; :class:`FixedStagedPruner` takes plans fixed in advance.

Unit selection with token pruning at K > 0 is two fixed stages: the tokens of the chosen units
from layer 0 on, the top ``keep_ratio`` of them from layer K on. Both keep sets are known before
the forward (they come from the guide), so each stage's plan over the sequence the previous stage
left is computed up front (:func:`lmms_sgl.method.stages.restrict`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from torch import nn

from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import KeepPlan
from lmms_sgl.method.stages import compose, restrict


class StagedPruner:
    """One :class:`VisualTokenPruner` per layer of ``layers``, armed together; ``plan`` is their
    composition (a plan over the original prompt, what reading logits back by position needs)."""

    def __init__(self, text_model: nn.Module, layers: Sequence[int]):
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"stage layers {list(layers)} must be strictly increasing")
        self.layers = list(layers)
        self.pruners = [VisualTokenPruner(text_model, layer) for layer in self.layers]
        for stage, pruner in enumerate(self.pruners):  # deepstack features follow every stage
            pruner.later = self.pruners[stage + 1 :]

    @contextmanager
    def installed(self) -> Iterator[StagedPruner]:
        with ExitStack() as stack:
            for pruner in self.pruners:  # earlier stages first: their hooks must run first
                stack.enter_context(pruner.installed())
            yield self

    def composed(self, stages: list[int]) -> KeepPlan | None:
        """The plans of ``stages`` composed onto the original prompt (``None`` for no stage)."""
        plan = None
        for stage in stages:
            current = self.pruners[stage].plan
            if current is None:
                raise RuntimeError(f"stage {stage} (layer {self.layers[stage]}) has no plan yet")
            plan = current if plan is None else compose(plan, current)
        return plan

    @property
    def plan(self) -> KeepPlan | None:
        if any(p.plan is None for p in self.pruners):
            return None
        return self.composed(list(range(len(self.pruners))))

    def stages(self, sample: int) -> list[tuple[int, int]]:
        """``[(layer, kept visual tokens), ...]`` of one sample in the last armed run."""
        pairs = zip(self.layers, self.pruners, strict=True)
        return [(layer, pruner.plan.kept_visual[sample]) for layer, pruner in pairs]


class FixedStagedPruner(StagedPruner):
    """Armed with one keep plan per layer, each over the *original* prompt and each keeping a subset
    of the previous one."""

    def arm(self, plans: Sequence[KeepPlan]) -> None:
        if len(plans) != len(self.pruners):
            raise ValueError(f"{len(plans)} keep plans for {len(self.pruners)} stages at {self.layers}")
        previous = None
        for pruner, plan in zip(self.pruners, plans, strict=True):
            pruner.arm(plan if previous is None else restrict(previous, plan))
            previous = plan
