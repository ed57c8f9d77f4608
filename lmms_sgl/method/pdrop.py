"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop visual tokens progressively.

The paper (Sec. 3.2) splits the language model into stages; at the end of each stage the image
tokens are ranked by the attention the *last instruction token* pays them, and only the top
``lambda`` fraction of the tokens still present goes on to the next stage, so stage s keeps
``lambda^s`` of them. Its default (Sec. 4.1, LLaVA-1.5-7B, 32 layers) drops at layers 8, 16 and 24
with ``lambda = 0.5``: four equal stages, three drops.

Mapped onto this package's settings (K = ``prune_layer``, r = ``keep_ratio``):

* the drops are the paper's three, equally spaced over the layers from K on: at
  ``K + floor(i (L - K) / 3)``, i = 0, 1, 2 (fewer when fewer than three layers are left);
* ``lambda`` is solved so that the stages' fractions, averaged over layers >= K, equal r; so the
  layer-averaged token ratio is ``(K + (L - K) r) / L`` as for every other method
  (``lmms_sgl.method.cost.token_ratio``), and ``keep_ratio=1`` is the unpruned model;
* each drop keeps ``keep_count(kept so far, lambda)`` tokens, ranked by the last prompt token's
  attention (softmax over all keys, summed over heads) in the layer before the drop, computed by
  that layer in the already pruned sequence (the paper's "lightweight attention" at the stage end:
  here it is that layer's own attention row, recorded through the recording attention).

Each drop is a :class:`~lmms_sgl.method.pruning.VisualTokenPruner` at its layer; pruners of later
stages see the sequence the earlier ones left (their hooks run in installation order), and their
plans are composed back onto the original prompt (:func:`lmms_sgl.method.stages.compose`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from lmms_sgl.method.importance import attention_probabilities, observing
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import KeepPlan, plan_from_scores
from lmms_sgl.method.stages import compose

DROPS = 3  # the paper's default: drops at L/4, L/2, 3L/4 (layers 8, 16, 24 of 32)


def drop_layers(num_layers: int, layer_k: int, drops: int = DROPS) -> list[int]:
    """The layers at which tokens are dropped: ``drops`` equally spaced from K on."""
    if not 1 <= layer_k < num_layers:
        raise ValueError(f"PDrop ranks at layer K-1, so it needs 1 <= K < {num_layers}; got K={layer_k}")
    span = num_layers - layer_k
    return sorted({layer_k + (i * span) // drops for i in range(drops)})


def stage_fraction(layers: list[int], num_layers: int, keep_ratio: float) -> float:
    """``lambda`` such that the fractions ``lambda^s`` of the stages, averaged over layers >= the
    first drop, equal ``keep_ratio`` (bisection: the average rises monotonically with lambda)."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio={keep_ratio!r} is outside (0, 1]")
    ends = [*layers[1:], num_layers]
    lengths = [end - start for start, end in zip(layers, ends, strict=True)]

    def average(fraction: float) -> float:
        return sum(n * fraction ** (s + 1) for s, n in enumerate(lengths)) / sum(lengths)

    if keep_ratio >= 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < keep_ratio else (low, middle)
    return high


class LastRowRecorder:
    """Per recorded layer, the attention (summed over heads) that one query row per sample pays to
    every key of that layer's prefill; fed by the recording attention (duck-types ``observe``)."""

    def __init__(self, layers: set[int], query_slots: Callable[[int, int], torch.Tensor]):
        self.layers = set(layers)
        self.query_slots = query_slots  # (layer, query length) -> [B] slot of each sample's query row
        self.rows: dict[int, torch.Tensor] = {}

    def observe(self, layer_idx: int, query, key, attention_mask, scaling) -> None:
        if layer_idx not in self.layers or query.shape[2] == 1 or layer_idx in self.rows:
            return  # other layers, decode steps, and a layer's later calls
        slots = self.query_slots(layer_idx, query.shape[2]).to(query.device)
        first, last = int(slots.min()), int(slots.max())
        probs = attention_probabilities(query, key, attention_mask, slice(first, last + 1), scaling)
        heads = probs.sum(1)  # [B, rows, kv]
        repeat = heads.shape[0] // slots.shape[0]  # beam search repeats each sample's rows
        picked = heads[:: max(repeat, 1)].gather(
            1, (slots - first)[:, None, None].expand(-1, 1, heads.shape[-1])
        )
        self.rows[layer_idx] = picked[:, 0].float()

    def active(self):
        return observing(self)

    def observe_weights(self, layer_idx: int, weights) -> None:
        raise RuntimeError("PDrop reads the recording SDPA attention, not the eager one")


class StagedPruner:
    """One :class:`VisualTokenPruner` per drop layer, armed together; ``plan`` is their composition
    (a plan over the original prompt, what reading logits back by position needs)."""

    def __init__(self, text_model: nn.Module, layers: list[int], fraction: float):
        self.layers, self.fraction = list(layers), fraction
        self.pruners = [VisualTokenPruner(text_model, layer) for layer in self.layers]
        for stage, pruner in enumerate(self.pruners):  # deepstack features follow every stage
            pruner.later = self.pruners[stage + 1 :]
        self.recorder: LastRowRecorder | None = None

    @contextmanager
    def installed(self) -> Iterator[StagedPruner]:
        with ExitStack() as stack:
            for pruner in self.pruners:  # earlier stages first: their hooks must run first
                stack.enter_context(pruner.installed())
            yield self

    def arm(
        self, visual_mask: torch.Tensor, attention_mask: torch.Tensor, query_positions: torch.Tensor | None
    ) -> LastRowRecorder:
        """Arm every stage; returns the recorder to activate (``query_positions``: each sample's
        query as an original position, default the last prompt token)."""

        def query_slots(layer: int, length: int) -> torch.Tensor:
            if query_positions is None:
                return torch.full((visual_mask.shape[0],), length - 1, dtype=torch.long)
            plan = self._composed([s for s, start in enumerate(self.layers) if start <= layer])
            if plan is None:
                return query_positions.long()
            return plan.slot_of().gather(1, query_positions.long()[:, None].to(plan.index.device))[:, 0]

        self.recorder = LastRowRecorder({layer - 1 for layer in self.layers}, query_slots)
        for stage, pruner in enumerate(self.pruners):
            pruner.arm(self._source(stage, visual_mask, attention_mask))
        return self.recorder

    def _composed(self, stages: list[int]) -> KeepPlan | None:
        plan = None
        for stage in stages:
            current = self.pruners[stage].plan
            if current is None:
                raise RuntimeError(f"PDrop stage {stage} has no plan yet")
            plan = current if plan is None else compose(plan, current)
        return plan

    def _source(self, stage: int, visual_mask: torch.Tensor, attention_mask: torch.Tensor):
        def plan() -> KeepPlan:
            before = self._composed(list(range(stage)))
            if before is None:
                visual, real = visual_mask, attention_mask.bool()
            else:
                visual = visual_mask.to(before.index.device).gather(1, before.index) & before.valid
                real = before.valid
            row = self.recorder.rows.get(self.layers[stage] - 1)
            if row is None:
                raise RuntimeError(f"PDrop: layer {self.layers[stage] - 1}'s attention was not recorded")
            visual = visual.to(row.device)
            scores = [row[b][visual[b]] for b in range(row.shape[0])]
            return plan_from_scores(scores, visual, real.to(row.device), self.fraction)

        return plan

    @property
    def plan(self) -> KeepPlan | None:
        if any(p.plan is None for p in self.pruners):
            return None
        return self._composed(list(range(len(self.pruners))))

    def stages(self, sample: int) -> list[tuple[int, int]]:
        """``[(layer, kept visual tokens), ...]`` of one sample in the last armed run."""
        pairs = zip(self.layers, self.pruners, strict=True)
        return [(layer, pruner.plan.kept_visual[sample]) for layer, pruner in pairs]
