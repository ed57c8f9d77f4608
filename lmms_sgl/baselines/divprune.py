"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the most *diverse* visual tokens.

Followed: the official code, ``vbdi/divprune`` at commit ``799e2d950aa01ba7860907f5a6d86061f885dca6``,
``LLaVA/llava/model/llava_arch.py`` (``DivPrune`` and its call in
``prepare_inputs_labels_for_multimodal``). Among the visual tokens X (the embeddings the language
model receives, i.e. the projector's output, after LLaVA-NeXT's unpadding and newline tokens) it
chooses ``int(round(ratio * N))`` tokens greedily for max-min cosine distance ``1 - cos(x, y)``
(the paper's Algorithm 1, Eq. 3-5):

* the first token is the one farthest from its own nearest neighbour (``argmax_i min_{j != i} d``);
* every next token is the remaining one farthest from the already chosen set
  (``argmax_{i not in S} min_{j in S} d(i, j)``), ties to the first index (``torch.argmax``).

Pruning happens before the first decoder layer (K = 0), jointly over a sample's visual tokens. The
project's extension, on request (``prune_layer > 0``): the same choice at layer K >= 1 among the
hidden states entering layer K, so DivPrune can share a schedule with SGL and the study can tell
what the layer does from what the rule does. Deliberate differences: the kept tokens keep their
original positions, as everywhere in this package (the official code renumbers them through
``generate``'s cumulative mask; kept positions are needed for Qwen-VL's multimodal RoPE and are
SGL's own rule); at least one token is kept where the rounded count is 0; the official code prunes
the first image of the first sample only, this one every sample of a batch. The selection costs one
Gram matrix, 2 N^2 d FLOPs per sample (:func:`selection_flops`); the greedy loop's comparisons are
not matrix products and are not counted, like softmax elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from lmms_sgl.method.registry import (
    FROM_ZERO,
    KeepMethod,
    MethodRun,
    PlanBatch,
    register,
    single_stage_reader,
)
from lmms_sgl.method.selection import KeepPlan, pack_positions


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` pairwise ``1 - cos`` of the rows of ``features`` (fp32)."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.T


def max_min_select(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (in choice order) of ``count`` rows chosen greedily for max-min cosine diversity."""
    n = features.shape[0]
    if not 0 <= count <= n:
        raise ValueError(f"cannot choose {count} of {n} tokens")
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    distance = cosine_distances(features)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    own = torch.eye(n, dtype=torch.bool, device=distance.device)
    nearest = distance.masked_fill(own, float("inf")).min(dim=1).values  # distance to the nearest other
    chosen = [int(nearest.argmax())]
    to_set = distance[chosen[0]].clone()  # each token's distance to the chosen set
    taken = torch.zeros(n, dtype=torch.bool, device=distance.device)
    taken[chosen[0]] = True
    for _ in range(count - 1):
        pick = int(to_set.masked_fill(taken, float("-inf")).argmax())
        chosen.append(pick)
        taken[pick] = True
        to_set = torch.minimum(to_set, distance[pick])
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


def divprune_count(n_visual: int, keep_ratio: float) -> int:
    """``int(round(keep_ratio * n_visual))`` as the official code computes it (Python's rounding,
    half to even: 90 of 256 at 0.35, 52 of 576 at 0.09), at least 1 and at most ``n_visual``."""
    if n_visual == 0:
        return 0
    return max(1, min(n_visual, int(round(keep_ratio * n_visual))))


def divprune_plan(
    embeds: torch.Tensor, visual_mask: torch.Tensor, attention_mask: torch.Tensor, keep_ratio: float
) -> KeepPlan:
    """Per sample, the :func:`divprune_count` most diverse visual tokens of ``embeds`` ``[B, P, d]``
    plus every real text token, in original order."""
    kept, kept_visual, total_visual = [], [], []
    for b in range(visual_mask.shape[0]):
        visual_positions = visual_mask[b].nonzero().flatten()
        text_positions = (attention_mask[b].bool() & ~visual_mask[b]).nonzero().flatten()
        n_visual = len(visual_positions)
        count = divprune_count(n_visual, keep_ratio)
        if count == n_visual:  # nothing to drop: no selection (and no selection cost)
            chosen = visual_positions
        else:
            picks = max_min_select(embeds[b, visual_positions.to(embeds.device)], count).cpu()
            chosen = visual_positions[picks]
        kept.append(torch.sort(torch.cat([text_positions, chosen.to(text_positions.device)])).values)
        kept_visual.append(count)
        total_visual.append(n_visual)
    index, valid = pack_positions(kept, visual_mask.shape[1])
    return KeepPlan(index, valid, visual_mask.shape[1], tuple(kept_visual), tuple(total_visual))


class InputEmbeddingTap:
    """The embeddings a text model receives in its prefill (``inputs_embeds``: text embeddings with
    the projector's output at the visual positions), read by a forward pre-hook on the text model."""

    def __init__(self, text_model: nn.Module):
        self.text_model = text_model
        self.embeds: torch.Tensor | None = None

    @contextmanager
    def active(self) -> Iterator[InputEmbeddingTap]:
        handle = self.text_model.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError(
                f"{type(module).__name__} was called without inputs_embeds; DivPrune reads the visual "
                "embeddings the text model receives"
            )
        if self.embeds is None or embeds.shape[1] > 1:  # the prefill, not a decode step
            self.embeds = embeds


def divprune_plan_source(
    tap: InputEmbeddingTap, visual_mask: torch.Tensor, attention_mask: torch.Tensor, keep_ratio: float
) -> Callable[[], KeepPlan]:
    """The plan, computed when the first decoder layer starts, from the embeddings the tap read."""

    def plan() -> KeepPlan:
        if tap.embeds is None:
            raise RuntimeError("DivPrune: the text model's input embeddings were not read")
        return divprune_plan(tap.embeds, visual_mask.to(tap.embeds.device), attention_mask, keep_ratio)

    return plan


def selection_flops(n_visual: int, kept: int, width: int) -> int:
    """The Gram matrix of the visual embeddings, 2 N^2 d; nothing when every token is kept."""
    return 0 if kept >= n_visual else 2 * n_visual * n_visual * width


def hidden_state_plan_source(
    pruner, visual_mask: torch.Tensor, attention_mask: torch.Tensor, keep_ratio: float
) -> Callable[[], KeepPlan]:
    """K >= 1: the plan, computed when layer K starts, from the hidden states entering it."""

    def plan() -> KeepPlan:
        inputs = pruner.inputs_at_k
        if inputs is None:
            raise RuntimeError(f"DivPrune: layer {pruner.layer_k}'s inputs were not seen")
        hidden = inputs.hidden
        return divprune_plan(hidden, visual_mask.to(hidden.device), attention_mask, keep_ratio)

    return plan


@register
class DivPrune(KeepMethod):
    name = "divprune"
    layers = FROM_ZERO

    def arm(self, batch: PlanBatch, stack: ExitStack) -> MethodRun:
        keep = batch.settings.keep_ratio
        if batch.layer_k == 0:
            tap = stack.enter_context(InputEmbeddingTap(batch.large.text_model).active())
            source = divprune_plan_source(tap, batch.visual, batch.attention_mask, keep)
        else:
            source = hidden_state_plan_source(batch.pruner, batch.visual, batch.attention_mask, keep)
        stack.enter_context(batch.pruner.installed())
        batch.pruner.arm(source)
        shape = batch.large.text_shape

        def flops(sample: int, prompt: int, n_visual: int, stages) -> float:
            return self.planned_selection_flops(shape, prompt, n_visual, stages)

        return MethodRun(single_stage_reader(batch), selection_flops=flops)

    def planned_stages(self, num_layers: int, layer_k: int, n_visual: int, keep_ratio: float):
        return [(layer_k, divprune_count(n_visual, keep_ratio))]

    def planned_selection_flops(self, shape, prompt: int, n_visual: int, stages) -> float:
        """The Gram matrix of the input embeddings (width: the language model's hidden size)."""
        return selection_flops(n_visual, stages[0][1], shape.hidden)
