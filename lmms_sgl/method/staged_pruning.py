"""Keep plans fixed in advance at several layers, on PDrop's stacked pruners.

Unit selection with token pruning at K > 0 is two such stages: the tokens of the chosen units
from layer 0 on, the top ``keep_ratio`` of them from layer K on. Both keep sets are known before
the forward (they come from the guide), so each stage's plan over the sequence the previous stage
left is computed up front (:func:`lmms_sgl.method.stages.restrict`); installation, composition
back onto the original prompt and the per-stage counts are :class:`~.pdrop.StagedPruner`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lmms_sgl.method.pdrop import StagedPruner
from lmms_sgl.method.selection import KeepPlan
from lmms_sgl.method.stages import restrict


class FixedStagedPruner(StagedPruner):
    """One pruner per layer of ``layers`` (increasing), armed with one keep plan per layer, each over
    the *original* prompt and each keeping a subset of the previous one."""

    def __init__(self, text_model: nn.Module, layers: Sequence[int]):
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"stage layers {list(layers)} must be strictly increasing")
        super().__init__(text_model, list(layers), fraction=1.0)

    def arm(self, plans: Sequence[KeepPlan]) -> None:  # type: ignore[override]
        if len(plans) != len(self.pruners):
            raise ValueError(f"{len(plans)} keep plans for {len(self.pruners)} stages at {self.layers}")
        previous = None
        for pruner, plan in zip(self.pruners, plans, strict=True):
            pruner.arm(plan if previous is None else restrict(previous, plan))
            previous = plan
