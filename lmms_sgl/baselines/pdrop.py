"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop visual tokens progressively.

Followed: the official code, ``Cooperx521/PyramidDrop`` at commit
``6444f304aee4b7edcb022839fb9e8cd07859704a``, ``llava/model/modeling_llama_pdrop.py``
(``pdrop_forward``, ``pdrop_rank_drop``). The language model is split into stages; just before the
first layer of each next stage (the paper's default: before layers 8, 16 and 24 of 32) the image
tokens still present are ranked by a *light attention* and only the best go on:

* the hidden states entering that layer go through **that layer's** ``input_layernorm``, ``q_proj``
  and ``k_proj`` (and the rotary embedding at the tokens' positions); the query is the **last
  prompt token**, the keys every token of the sequence (padding masked), softmax in fp32, the
  probabilities **averaged over heads**;
* stage s keeps ``int(N * lambda^s)`` of the N original image tokens (the official
  ``image_token_ratio_list`` of cumulative ratios ``[1, 0.5, 0.25, 0.125]``), the top ones by that
  attention, in their original order.

Mapped onto this package's settings (K = ``prune_layer``, r = ``keep_ratio``):

* the drops are the paper's three, equally spaced over the layers from K on: at
  ``K + floor(i (L - K) / 3)``, i = 0, 1, 2 (fewer when fewer than three layers are left);
* ``lambda`` is solved so that the stages' fractions, averaged over layers >= K, equal r; so the
  layer-averaged token ratio is ``(K + (L - K) r) / L`` as for every other method
  (``lmms_sgl.method.cost.token_ratio``), and ``keep_ratio=1`` is the unpruned model.

Deliberate differences: kept tokens keep their original positions (the official code renumbers
them after each drop and shifts each decode token's position per stage; kept positions are needed
for Qwen-VL's multimodal RoPE and are SGL's and every other method's rule here); query and key
heads are matched as the layer's own attention does (grouped-query attention repeats the key heads;
the official code assumes Vicuna's equal counts); only the query row is projected (the official code
projects every row's query and then uses the last: the same scores for less work); at least one
image token is kept per stage.

Each drop is a stage of a :class:`~lmms_sgl.method.staged_pruning.StagedPruner`: later stages see
the sequence the earlier ones left, and their plans are composed back onto the original prompt.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack

import torch
from torch import nn

from lmms_sgl.method.cost import TransformerShape
from lmms_sgl.method.pruning import LayerInputs, gather_tokens
from lmms_sgl.method.registry import (
    AFTER_FIRST,
    KeepMethod,
    MethodRun,
    PlanBatch,
    register,
    single_stage_reader,
)
from lmms_sgl.method.selection import KeepPlan, plan_from_scores
from lmms_sgl.method.staged_pruning import StagedPruner
from lmms_sgl.method.stages import layer_tokens

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


def stage_count(n_visual: int, fraction: float, stage: int) -> int:
    """Image tokens kept after drop ``stage`` (0-based): ``int(N * fraction^(stage + 1))`` of the
    original N, at least one (the official cumulative ratios; 1.0 keeps all)."""
    if n_visual == 0:
        return 0
    return max(1, min(n_visual, int(n_visual * fraction ** (stage + 1))))


def rotary_function(attention: nn.Module):
    """The model's own ``apply_rotary_pos_emb`` (its modeling module's), as its attention uses it."""
    module = sys.modules[type(attention).__module__]
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is None:
        raise TypeError(f"{type(attention).__name__}: no apply_rotary_pos_emb in {module.__name__}")
    return apply


def light_attention(inputs: LayerInputs, query_slots: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """``[B, P]``: the attention each sample's query row (``query_slots`` ``[B]``) pays to every key
    of the sequence entering ``inputs.layer``, computed with that layer's own norm, projections and
    rotary embedding, softmax over the ``key_valid`` keys in fp32, averaged over heads."""
    layer, hidden = inputs.layer, inputs.hidden
    cos, sin = inputs.kwargs["position_embeddings"]
    if hidden.shape[0] != query_slots.shape[0]:  # beam search repeats each sample's rows
        step = hidden.shape[0] // query_slots.shape[0]
        hidden = hidden[::step]
        cos, sin = (t if t.shape[-3] == 1 else t[..., ::step, :, :] for t in (cos, sin))
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    with torch.no_grad():
        normed = layer.input_layernorm(hidden)
        slots = query_slots.to(normed.device)
        rows = normed[torch.arange(batch, device=normed.device), slots]
        query = attention.q_proj(rows[:, None]).view(batch, 1, -1, head_dim)
        key = attention.k_proj(normed).view(batch, length, -1, head_dim)
        if getattr(attention, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # [B, H, 1, hd], [B, KV, P, hd]
        pick = slots[:, None].to(cos.device)
        apply = rotary_function(attention)
        query = apply(query, query, gather_tokens(cos, pick, -2), gather_tokens(sin, pick, -2))[0]
        key = apply(key, key, cos, sin)[1]
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = (query.float() @ key.float().transpose(-1, -2))[:, :, 0] * attention.scaling
        scores = scores.masked_fill(~key_valid.to(scores.device)[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1).mean(1)  # [B, P]


def light_attention_flops(shape: TransformerShape, keys: int) -> int:
    """One drop's ranking: ``k_proj`` over ``keys`` tokens, ``q_proj`` of the query row, and that
    row's ``QK^T`` (norms and softmax are elementwise and not counted)."""
    key_width, query_width = shape.kv_heads * shape.head_dim, shape.heads * shape.head_dim
    return 2 * keys * shape.hidden * key_width + 2 * shape.hidden * query_width + 2 * query_width * keys


class PDropPruner(StagedPruner):
    """One pruner per drop layer; each stage's plan is computed when its layer starts, from the light
    attention over the sequence the earlier stages left."""

    def __init__(self, text_model: nn.Module, layers: list[int], fraction: float):
        super().__init__(text_model, layers)
        self.fraction = fraction

    def arm(
        self, visual_mask: torch.Tensor, attention_mask: torch.Tensor, query_positions: torch.Tensor | None
    ) -> None:
        """Arm every stage (``query_positions``: each sample's query as an original position,
        default the last prompt token)."""
        for stage, pruner in enumerate(self.pruners):
            pruner.arm(self._source(stage, visual_mask, attention_mask, query_positions))

    def _source(
        self,
        stage: int,
        visual_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        query_positions: torch.Tensor | None,
    ):
        def plan() -> KeepPlan:
            inputs = self.pruners[stage].inputs_at_k
            if inputs is None:
                raise RuntimeError(f"PDrop: layer {self.layers[stage]}'s inputs were not seen")
            device = inputs.hidden.device
            before = self.composed(list(range(stage)))
            if before is None:
                visual, real = visual_mask.to(device), attention_mask.bool().to(device)
            else:
                before = before.to(device)
                visual = visual_mask.to(device).gather(1, before.index) & before.valid
                real = before.valid
            length = visual.shape[1]
            if query_positions is None:
                slots = torch.full((visual.shape[0],), length - 1, dtype=torch.long, device=device)
            elif before is None:
                slots = query_positions.long().to(device)
            else:
                slots = before.slot_of().gather(1, query_positions.long().to(device)[:, None])[:, 0]
            rows = light_attention(inputs, slots, real)
            counts = [stage_count(int(n), self.fraction, stage) for n in visual_mask.sum(1).tolist()]
            scores = [rows[b][visual[b]] for b in range(visual.shape[0])]
            return plan_from_scores(scores, visual, real, self.fraction, counts)

        return plan


@register
class PDrop(KeepMethod):
    name = "pdrop"
    layers = AFTER_FIRST

    def make_pruner(self, large, settings, layer_k: int) -> PDropPruner:
        layers = drop_layers(large.num_layers, layer_k)
        return PDropPruner(
            large.text_model, layers, stage_fraction(layers, large.num_layers, settings.keep_ratio)
        )

    def arm(self, batch: PlanBatch, stack: ExitStack) -> MethodRun:
        pruner = batch.pruner
        query = None if batch.query_rows is None else batch.query_rows.long().argmax(1)
        stack.enter_context(pruner.installed())
        pruner.arm(batch.visual, batch.attention_mask, query)
        shape = batch.large.text_shape

        def flops(sample: int, prompt: int, n_visual: int, stages) -> float:
            return self.planned_selection_flops(shape, prompt, n_visual, stages)

        return MethodRun(single_stage_reader(batch), selection_flops=flops)

    def planned_stages(self, num_layers: int, layer_k: int, n_visual: int, keep_ratio: float):
        layers = drop_layers(num_layers, layer_k)
        fraction = stage_fraction(layers, num_layers, keep_ratio)
        return [(layer, stage_count(n_visual, fraction, s)) for s, layer in enumerate(layers)]

    def planned_selection_flops(self, shape, prompt: int, n_visual: int, stages) -> float:
        """Each drop's light attention over the tokens the layer before it saw."""
        seen = layer_tokens(shape.num_layers, prompt, n_visual, stages)
        return sum(light_attention_flops(shape, seen[layer - 1]) for layer, _ in stages)
