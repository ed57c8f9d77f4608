"""Pruning in stages: which tokens each group of decoder layers sees, and what that costs.

A sample's *stages* are ``[(layer, kept_visual), ...]`` with increasing layers: layers from
``layer`` up to the next stage's layer see ``kept_visual`` visual tokens (plus every text token),
layers before the first stage see all of them. One stage ``[(K, kept)]`` is SGL, FastV, random,
DivPrune and VisionZip (K = 0); PDrop has several. The FLOPs use the per-layer formula of
:mod:`lmms_sgl.method.cost` with the same conventions (full n x m attention, LM head per logit).
"""

from __future__ import annotations

from collections.abc import Sequence

from lmms_sgl.method.cost import TransformerShape, layer_flops, lm_head_flops
from lmms_sgl.method.selection import KeepPlan, pack_positions

Stages = Sequence[tuple[int, int]]


def layer_tokens(num_layers: int, prompt: int, n_visual: int, stages: Stages) -> list[int]:
    """Prompt tokens each decoder layer sees (text tokens are never dropped)."""
    seen = [prompt] * num_layers
    for index, (layer, kept) in enumerate(stages):
        end = stages[index + 1][0] if index + 1 < len(stages) else num_layers
        if not 0 <= layer <= end <= num_layers:
            raise ValueError(f"stages {list(stages)} are not increasing layers within [0, {num_layers}]")
        for position in range(layer, end):
            seen[position] = prompt - n_visual + kept
    return seen


def staged_token_ratio(num_layers: int, n_visual: int, stages: Stages) -> float:
    """Visual tokens processed, averaged over layers, as a fraction of ``n_visual`` (cost.token_ratio
    for one stage)."""
    if n_visual == 0:
        return 1.0
    seen = layer_tokens(num_layers, n_visual, n_visual, stages)
    return sum(seen) / (num_layers * n_visual)


def staged_generation_flops(
    shape: TransformerShape, prompt: int, n_visual: int, new_tokens: int, stages: Stages, logits: int = 1
) -> int:
    """Prefill over ``prompt`` tokens (``logits`` positions through the LM head) plus the decode steps
    of a ``new_tokens`` answer (step t attends to the layer's prompt tokens + t); ``new_tokens=0``
    counts the prefill alone."""
    one = TransformerShape(**{**shape.__dict__, "num_layers": 1})
    seen = layer_tokens(shape.num_layers, prompt, n_visual, stages)
    total = sum(layer_flops(one, n, n) for n in seen) + lm_head_flops(shape, logits)
    for step in range(1, max(new_tokens, 1)):
        total += sum(layer_flops(one, 1, n + step) for n in seen) + lm_head_flops(shape, 1)
    return total


def compose(outer: KeepPlan, inner: KeepPlan) -> KeepPlan:
    """``inner`` (a plan over ``outer``'s pruned sequence) as a plan over the original prompt."""
    if inner.prompt_length != outer.pruned_length:
        raise ValueError(
            f"inner plan is for {inner.prompt_length} tokens, the outer plan keeps {outer.pruned_length}"
        )
    index = outer.index.gather(1, inner.index)
    valid = inner.valid & outer.valid.gather(1, inner.index)
    index = index.masked_fill(~valid, 0)
    return KeepPlan(index, valid, outer.prompt_length, inner.kept_visual, outer.total_visual)


def restrict(outer: KeepPlan, inner: KeepPlan) -> KeepPlan:
    """``inner`` (a plan over the original prompt keeping a subset of what ``outer`` keeps) as a plan
    over ``outer``'s pruned sequence: the inverse of :func:`compose`, for stages fixed in advance."""
    if inner.prompt_length != outer.prompt_length or inner.index.shape[0] != outer.index.shape[0]:
        raise ValueError(
            f"plans for different prompts: {tuple(inner.index.shape)} over {inner.prompt_length} tokens "
            f"vs {tuple(outer.index.shape)} over {outer.prompt_length}"
        )
    slots = outer.slot_of()
    kept = []
    for b in range(inner.index.shape[0]):
        positions = inner.index[b][inner.valid[b]].to(slots.device)
        rows = slots[b, positions]
        if bool((rows < 0).any()):
            dropped = positions[rows < 0].tolist()[:5]
            raise ValueError(f"sample {b}: the inner plan keeps positions {dropped} the outer plan dropped")
        kept.append(rows)
    index, valid = pack_positions(kept, outer.pruned_length)
    return KeepPlan(index, valid, outer.pruned_length, inner.kept_visual, outer.kept_visual)
