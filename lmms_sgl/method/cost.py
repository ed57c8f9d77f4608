"""Cost model: layer-averaged visual-token ratio, presets, and analytic FLOPs.

Token ratio (sgl-method.md section 1.5): the fraction of visual tokens the large model processes,
averaged over its L decoder layers, when layers ``< K`` see all of them and layers ``>= K`` keep a
fraction r::

    ratio = (K + (L - K) * r) / L        # 48 layers: (19, 0.4) -> 64 %, (9, 0.2) -> 35 %, (2, 0.05) -> 9 %

FLOPs count the matrix multiplications (2 FLOPs per multiply-add) that dominate a transformer, the
same operations ``torch.utils.flop_counter`` counts: per decoder layer with n queries over m keys,

    q, o projections  2 * n * d * (H * hd) * 2
    k, v projections  2 * n * d * (Hkv * hd) * 2
    attention         2 * n * m * H * hd * 2        (QK^T and AV, full n x m: masks do not skip work)
    MLP               2 * n * d * f * (3 if gated else 2)

plus the LM head (2 * d * V per position whose logits are computed). Vision towers use the same
layer formula with full attention, plus the patch embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_PRESETS: dict[float, tuple[float, float]] = {
    # token_ratio -> (prune_layer, keep_ratio), as in the paper's 26B settings
    0.64: (0.4, 0.4),
    0.35: (0.2, 0.2),
    0.09: (0.05, 0.05),
}


def prune_layer_index(num_layers: int, prune_layer: float) -> int:
    """K = int(L * prune_layer), as the official code computes it."""
    return int(num_layers * prune_layer)


def token_ratio(layer_k: int, num_layers: int, keep_ratio: float) -> float:
    """Layer-averaged fraction of visual tokens processed: (K + (L - K) * r) / L."""
    return (layer_k + (num_layers - layer_k) * keep_ratio) / num_layers


def shared_schedule(target: float, num_layers: int, layer_k: int = 1) -> tuple[float, float]:
    """``(prune_layer, keep_ratio)`` reaching the layer-averaged ``target`` ratio with pruning from
    layer ``layer_k`` on. Methods sharing one schedule differ only in which tokens they keep; K = 1 is
    the earliest layer at which FastV can rank (it reads layer K-1's attention). ``prune_layer`` sits
    mid-layer, so :func:`prune_layer_index` gives back ``layer_k``."""
    keep = (target * num_layers - layer_k) / (num_layers - layer_k)
    if not 0 < keep <= 1:
        raise ValueError(f"target ratio {target} is out of reach with K={layer_k} of {num_layers} layers")
    prune_layer = (layer_k + 0.5) / num_layers
    if prune_layer_index(num_layers, prune_layer) != layer_k:
        raise ValueError(f"K={layer_k} is not a layer of a {num_layers}-layer model")
    return prune_layer, keep


def measured_token_ratio(layer_k: int, num_layers: int, kept_visual: int, total_visual: int) -> float:
    """The same average for a concrete sample (``kept / total`` is floor-rounded r)."""
    if total_visual == 0:
        return 1.0
    return token_ratio(layer_k, num_layers, kept_visual / total_visual)


@dataclass(frozen=True)
class TransformerShape:
    """What the FLOPs of a stack of transformer layers depend on."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    gated_mlp: bool = True
    vocab: int = 0

    @classmethod
    def from_text_config(cls, config) -> TransformerShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            gated_mlp=True,
            vocab=config.vocab_size,
        )

    @classmethod
    def from_vision_config(cls, config) -> TransformerShape:
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            intermediate=config.intermediate_size,
            gated_mlp=False,
        )


def layer_flops(shape: TransformerShape, n_query: int, n_kv: int) -> int:
    d, hd = shape.hidden, shape.head_dim
    projections = 2 * n_query * d * hd * (2 * shape.heads + 2 * shape.kv_heads)
    attention = 4 * n_query * n_kv * shape.heads * hd
    mlp = 2 * n_query * d * shape.intermediate * (3 if shape.gated_mlp else 2)
    return projections + attention + mlp


def lm_head_flops(shape: TransformerShape, positions: int) -> int:
    return 2 * positions * shape.hidden * shape.vocab


def _split(shape: TransformerShape, prompt: int, layer_k: int | None, pruned: int | None) -> tuple[int, int]:
    """(layers that see every token, tokens the other layers see); no pruning = all layers, all tokens."""
    return (shape.num_layers if layer_k is None else layer_k), (prompt if pruned is None else pruned)


def prefill_flops(
    shape: TransformerShape,
    prompt: int,
    layer_k: int | None = None,
    pruned: int | None = None,
    logits: int = 1,
) -> int:
    """One forward over ``prompt`` tokens; layers ``>= layer_k`` see ``pruned`` tokens."""
    k, kept = _split(shape, prompt, layer_k, pruned)
    full = k * layer_flops(shape, prompt, prompt)
    rest = (shape.num_layers - k) * layer_flops(shape, kept, kept)
    return full + rest + lm_head_flops(shape, logits)


def decode_flops(
    shape: TransformerShape,
    prompt: int,
    new_tokens: int,
    layer_k: int | None = None,
    pruned: int | None = None,
) -> int:
    """The decode steps of a generation of ``new_tokens`` tokens: ``new_tokens - 1`` forwards of one token.

    Step t (1-based) attends to ``prompt + t`` keys in layers ``< K`` and ``pruned + t`` in layers ``>= K``.
    """
    k, kept = _split(shape, prompt, layer_k, pruned)
    total = 0
    for step in range(1, max(new_tokens, 1)):
        total += k * layer_flops(shape, 1, prompt + step)
        total += (shape.num_layers - k) * layer_flops(shape, 1, kept + step)
        total += lm_head_flops(shape, 1)
    return total


def chunk_flops(
    shape: TransformerShape,
    new_tokens: int,
    past: int,
    layer_k: int | None = None,
    pruned_past: int | None = None,
) -> int:
    """One forward of ``new_tokens`` tokens after ``past`` cached ones, logits at every new position
    (speculative verification and drafting): layers ``< K`` attend over ``past + new_tokens`` keys,
    the others over ``pruned_past + new_tokens``. A decode step is the case ``new_tokens = 1``."""
    k, kept = _split(shape, past, layer_k, pruned_past)
    full = k * layer_flops(shape, new_tokens, past + new_tokens)
    rest = (shape.num_layers - k) * layer_flops(shape, new_tokens, kept + new_tokens)
    return full + rest + lm_head_flops(shape, new_tokens)


def generation_flops(
    shape: TransformerShape,
    prompt: int,
    new_tokens: int,
    layer_k: int | None = None,
    pruned: int | None = None,
) -> int:
    return prefill_flops(shape, prompt, layer_k, pruned) + decode_flops(
        shape, prompt, new_tokens, layer_k, pruned
    )


def vit_flops(shape: TransformerShape, tokens: int, patch_size: int, patches: int, channels: int = 3) -> int:
    """A vision transformer over one image: patch embedding plus ``num_layers`` full-attention layers."""
    embedding = 2 * patches * channels * patch_size * patch_size * shape.hidden
    return embedding + shape.num_layers * layer_flops(shape, tokens, tokens)


def mlp_chain_flops(tokens: int, widths: list[int]) -> int:
    """A chain of linear layers ``widths[0] -> widths[1] -> ...`` applied to ``tokens`` rows."""
    return sum(2 * tokens * a * b for a, b in zip(widths[:-1], widths[1:], strict=False))


def recording_flops(shape: TransformerShape, prompt: int, rows: int, fed_steps: int) -> int:
    """Extra work of the recording attention: ``QK^T`` for the recorded rows in every layer.

    Prefill: ``rows`` query rows over ``prompt`` keys; decode: one row over ``prompt + t`` keys for
    each of the ``fed_steps`` steps. Softmax and sums are elementwise and not counted.
    """
    per_row_key = 2 * shape.heads * shape.head_dim * shape.num_layers
    decode_keys = sum(prompt + step for step in range(1, fed_steps + 1))
    return per_row_key * (rows * prompt + decode_keys)
