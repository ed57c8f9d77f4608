"""Each benchmark row's operating point priced on the real pair it stands for: InternVL2-2B -> 26B.

The benchmarks measure random-weight pairs scaled down to run on a CPU (:mod:`.common`,
:mod:`.units`). Their FLOPs ratios hold for those pairs only: the units pair matches the 26B's
vision / language split at full length, but its 24 x 256 language model spends a larger share on
attention than InternLM2-20B (48 x 6144) does (56 % of its layer FLOPs at 1,825 tokens against 5 %),
and its guide is a larger share of the large model.
So every row that states a goal also gets the same operating point priced on the real pair, from
the bundled ``config.json`` files and the formulas the run-time records use
(``lmms_sgl.costs.layout.internvl_layout``, ``lmms_sgl.costs.methods.guide_flops``, the method's
``planned_stages`` / ``planned_selection_flops``, ``staged_generation_flops``), and goals are
judged on that ratio. The request is ``lmms-sgl-cost``'s default prompt of 64 text tokens (the
benchmarks' factory tokenizer spells their question in about 33; the real checkpoints' chat
templates add a system turn) and the benchmark's own answer length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from lmms_sgl.costs.layout import internvl_layout
from lmms_sgl.costs.methods import Side, Workload, guide_flops
from lmms_sgl.method.cost import (
    TransformerShape,
    generation_flops,
    layer_flops,
    prune_layer_index,
    recording_flops,
)
from lmms_sgl.method.registry import method_named
from lmms_sgl.method.stages import staged_generation_flops

GUIDE, LARGE = "InternVL2-2B", "InternVL2-26B"
LABEL = "InternVL2-2B → 26B"
TOKENS_PER_TILE = 256
PROMPT_TOKENS = 64  # text tokens of the priced request: lmms-sgl-cost's default


@dataclass(frozen=True)
class Point:
    """What a benchmark row runs, in terms that carry over to another pair.

    Attributes:
        large_tiles: the large model's tiles (a thumbnail is added when > 1).
        guide_tiles: the guide's tiles (``None``: no guide runs).
        method: ``large_only``, ``sgl`` or ``fastv``.
        prune_layer: K as a fraction of the large model's layers (``None``: unpruned).
        keep_ratio: visual tokens kept from layer K on.
        keep_units: unit selection: every token of this many tiles from layer 0 (``None``: off).
        keep_global: with ``keep_units``, the thumbnail is kept besides them.
        skip_units: the large model's tower encodes only the tiles holding a kept token.
    """

    large_tiles: int
    guide_tiles: int | None = None
    method: str = "sgl"
    prune_layer: float | None = None
    keep_ratio: float = 1.0
    keep_units: int | None = None
    keep_global: bool = True
    skip_units: bool = False

    @property
    def visual_tokens(self) -> int:
        return TOKENS_PER_TILE * (self.large_tiles + (self.large_tiles > 1))


@functools.cache
def _config(name: str):
    from lmms_sgl.costs.sources import read_checkpoint

    return read_checkpoint(name, "--large" if name == LARGE else "--guide").config


def _shape(name: str) -> TransformerShape:
    return TransformerShape.from_text_config(_config(name).text_config)


def point_flops(
    point: Point, prompt_text: int, answer: int, encoded_units: int | None = None, exits: bool = False
) -> float:
    """FLOPs of one request at ``point`` on the real pair; ``encoded_units``: the tiles the large
    model's tower encoded in the benchmark run (unit skipping depends on where the guide's kept
    tokens fell; the same keep set is priced); ``exits``: an exit threshold is set, so the guide's
    consistency pass runs."""
    large = _config(LARGE)
    layout = internvl_layout(large, point.large_tiles)
    n_visual, shape = layout.visual_tokens, _shape(LARGE)
    per_tile = layout.units[0].flops
    prompt = prompt_text + n_visual
    stages: list[tuple[int, int]] = []
    selection = 0.0
    encoded = len(layout.units)
    if point.keep_units is not None:  # every token of the chosen tiles, from layer 0 (exact skipping)
        encoded = point.keep_units + int(point.keep_global and point.large_tiles > 1)
        stages = [(0, encoded * TOKENS_PER_TILE)]
    elif point.prune_layer is not None:
        method = method_named(point.method)
        layer_k = prune_layer_index(shape.num_layers, point.prune_layer)
        stages = method.planned_stages(shape.num_layers, layer_k, n_visual, point.keep_ratio)
        selection = method.planned_selection_flops(shape, prompt, n_visual, stages)
        if point.skip_units and encoded_units is not None:
            encoded = encoded_units
    flops = encoded * per_tile + staged_generation_flops(shape, prompt, n_visual, answer, stages) + selection
    if point.guide_tiles is not None:
        guide = _config(GUIDE)
        side = Side(GUIDE, _shape(GUIDE), internvl_layout(guide, point.guide_tiles))
        flops += guide_flops(side, Workload(prompt_text, answer), consistency=exits)
    return float(flops)


def alone_flops(large_tiles: int, prompt_text: int, answer: int) -> float:
    """The unpruned large model on the real pair at ``large_tiles``."""
    layout = internvl_layout(_config(LARGE), large_tiles)
    return float(
        layout.vision_flops + generation_flops(_shape(LARGE), prompt_text + layout.visual_tokens, answer)
    )


def ratio(
    point: Point,
    prompt_text: int,
    answer: int,
    reference_tiles: int,
    exit_rate: float = 0.0,
    encoded_units: int | None = None,
) -> float:
    """``point`` over the large model alone at ``reference_tiles`` on the real pair; with
    ``exit_rate``, the guide answers that share alone (the large model's part is weighted)."""
    total = point_flops(point, prompt_text, answer, encoded_units, exits=bool(exit_rate))
    if exit_rate:
        large = point_flops(replace(point, guide_tiles=None), prompt_text, answer, encoded_units)
        total = (total - large) + (1.0 - exit_rate) * large
    return total / alone_flops(reference_tiles, prompt_text, answer)


def recording_ratio(n_visual: int, prompt_text: int, answer: int) -> float:
    """The guide's generation with the recording attention over plain generation, on the real guide
    (its FLOPs; the recording's rows are the prompt's text after the image, then each fed-back token)."""
    shape, prompt = _shape(GUIDE), prompt_text + n_visual
    plain = generation_flops(shape, prompt, answer)
    return (plain + recording_flops(shape, prompt, prompt_text + 1, max(answer - 1, 0))) / plain


def prefill_ideal(point: Point, prompt_text: int) -> float:
    """The real large model's language-model prefill FLOPs unpruned over pruned at ``point``."""
    shape, n_visual = _shape(LARGE), point.visual_tokens
    prompt = prompt_text + n_visual
    layer_k = prune_layer_index(shape.num_layers, point.prune_layer)
    stages = method_named(point.method).planned_stages(shape.num_layers, layer_k, n_visual, point.keep_ratio)
    full = staged_generation_flops(shape, prompt, n_visual, 0, [])
    return full / staged_generation_flops(shape, prompt, n_visual, 0, stages)


@functools.cache
def parameters(name: str) -> dict[str, int]:
    """Parameter counts of a bundled checkpoint, built on the meta device from its config (no weights):
    ``total``, and ``decode`` (what one decode step reads: the language model's layers and head)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(_config(name))
    text = model.model.language_model
    embedding = text.get_input_embeddings().weight.numel()
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "decode": sum(p.numel() for p in text.parameters()) - embedding + model.lm_head.weight.numel(),
    }


def weights_ratio() -> float:
    """Guide and large model's weights over the large model's: the pipeline's memory floor."""
    return (parameters(GUIDE)["total"] + parameters(LARGE)["total"]) / parameters(LARGE)["total"]


def decode_read_ratio() -> float:
    """Weights one guide decode step reads over one large decode step's (decode is bandwidth-bound)."""
    return parameters(GUIDE)["decode"] / parameters(LARGE)["decode"]


def linear_attention_ratio(shape: TransformerShape, tokens: int) -> float:
    """A language model's prefill FLOPs in its projections and MLP over those in attention
    (``QK^T`` and ``AV``) at ``tokens`` tokens: how much pruning's quadratic part weighs."""
    layer = replace(shape, num_layers=1)
    attention = 2 * tokens * tokens * shape.heads * shape.head_dim * 2
    return (layer_flops(layer, tokens, tokens) - attention) / attention


def real_linear_attention_ratio(tokens: int) -> float:
    return linear_attention_ratio(_shape(LARGE), tokens)


def attention_note(shape: TransformerShape, tokens: int) -> str:
    """How the benchmark's large language model and InternLM2-20B split their layers' prefill FLOPs."""
    mine = 1 / (1 + linear_attention_ratio(shape, tokens))
    theirs = 1 / (1 + real_linear_attention_ratio(tokens))
    return (
        f"At {tokens:,} tokens attention (QK^T and AV) is {mine:.0%} of this large language model's layer "
        f"FLOPs and {theirs:.0%} of InternLM2-20B's (the 26B's), so a pruned token saves a larger share "
        "here, and this guide is a larger share of its large model: the benchmark pair's FLOPs ratios are "
        "lower than the real pair's."
    )
