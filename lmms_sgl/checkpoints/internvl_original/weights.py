"""Original InternVL tensor names and layouts -> transformers ``InternVLForConditionalGeneration``.

Pure functions: one source tensor in, its transformers tensor(s) out, no state. They work on meta
tensors too, so the whole plan (names and shapes) is checked from the safetensors headers before a
single weight is read. Most tensors are only renamed; two need more than that:

* InternLM2's fused ``attention.wqkv`` stores its rows grouped per key/value head: for each of the
  ``num_key_value_heads`` groups, ``num_key_value_groups`` query heads, then the group's key head,
  then its value head. Query head ``g * groups + i`` attends with key/value head ``g``, which is
  exactly the order transformers' grouped-query attention expects once the query heads of all
  groups are concatenated in order.
* InternViT's fused ``attn.qkv`` stacks query, key and value (each ``hidden_size`` rows).

Anything unknown is refused: a tensor we cannot place would otherwise be silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lmms_sgl.checkpoints.internvl_original.config import OriginalCheckpointError, OriginalInternVL

VISION = "model.vision_tower."
TEXT = "model.language_model."

_VISION_RENAMES = {
    "vision_model.embeddings.class_embedding": VISION + "embeddings.cls_token",
    "vision_model.embeddings.position_embedding": VISION + "embeddings.position_embeddings",
    "vision_model.embeddings.patch_embedding.weight": VISION
    + "embeddings.patch_embeddings.projection.weight",
    "vision_model.embeddings.patch_embedding.bias": VISION + "embeddings.patch_embeddings.projection.bias",
}
_VISION_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")
_VISION_LAYER_RENAMES = {
    "attn.proj.weight": "attention.projection_layer.weight",
    "attn.proj.bias": "attention.projection_layer.bias",
    "attn.q_norm.weight": "attention.q_norm.weight",
    "attn.k_norm.weight": "attention.k_norm.weight",
    "ls1": "lambda_1",
    "ls2": "lambda_2",
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_PROJECTOR = re.compile(r"mlp1\.(\d)\.(weight|bias)")
_PROJECTOR_LAYERS = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}

_INTERNLM2_LAYER = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)")
_INTERNLM2_LAYER_RENAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
# Non-persistent buffers some older checkpoints saved; transformers recomputes them.
_DROPPED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class WeightLayout:
    """The few numbers the tensor mapping needs, taken from the original config."""

    text_arch: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vision_hidden: int

    @classmethod
    def from_original(cls, original: OriginalInternVL) -> WeightLayout:
        llm = original.llm
        heads = int(llm["num_attention_heads"])
        return cls(
            text_arch=original.text_arch,
            num_heads=heads,
            num_kv_heads=int(llm.get("num_key_value_heads") or heads),
            head_dim=int(llm.get("head_dim") or llm["hidden_size"] // heads),
            vision_hidden=int(original.vision["hidden_size"]),
        )


class UnconvertibleTensorError(OriginalCheckpointError):
    """A source tensor with no exact place in the transformers model."""


def split_internlm2_wqkv(tensor: torch.Tensor, layout: WeightLayout) -> tuple[torch.Tensor, ...]:
    """Split InternLM2's per-group fused ``wqkv`` (weight or bias) into q, k and v."""
    groups = layout.num_heads // layout.num_kv_heads
    rows = layout.num_kv_heads * (groups + 2) * layout.head_dim
    if tensor.shape[0] != rows:
        raise UnconvertibleTensorError(
            f"attention.wqkv has {tensor.shape[0]} rows; {layout.num_kv_heads} key/value groups of "
            f"({groups} query + 1 key + 1 value) heads of {layout.head_dim} need {rows}"
        )
    grouped = tensor.reshape(layout.num_kv_heads, groups + 2, layout.head_dim, *tensor.shape[1:])
    tail = tuple(tensor.shape[1:])
    query = grouped[:, :groups].reshape(layout.num_heads * layout.head_dim, *tail)
    key = grouped[:, groups].reshape(layout.num_kv_heads * layout.head_dim, *tail)
    value = grouped[:, groups + 1].reshape(layout.num_kv_heads * layout.head_dim, *tail)
    return query.contiguous(), key.contiguous(), value.contiguous()


def split_vision_qkv(tensor: torch.Tensor, layout: WeightLayout) -> tuple[torch.Tensor, ...]:
    """Split InternViT's fused ``qkv`` (query, key, value stacked) into three."""
    if tensor.shape[0] != 3 * layout.vision_hidden:
        raise UnconvertibleTensorError(
            f"attn.qkv has {tensor.shape[0]} rows; 3 x hidden_size {layout.vision_hidden} expected"
        )
    return tuple(part.contiguous() for part in tensor.split(layout.vision_hidden, dim=0))


def convert_tensor(name: str, tensor: torch.Tensor, layout: WeightLayout) -> dict[str, torch.Tensor]:
    """The transformers tensor(s) for one original tensor ({} for buffers transformers recomputes).

    Raises :class:`UnconvertibleTensorError` for a name with no exact counterpart.
    """
    if _DROPPED.match(name):
        return {}
    if name.startswith("vision_model."):
        return _vision(name, tensor, layout)
    if name.startswith("mlp1."):
        match = _PROJECTOR.fullmatch(name)
        if not match or match.group(1) not in _PROJECTOR_LAYERS:
            raise UnconvertibleTensorError(f"{name}: mlp1 has layers 0 (LayerNorm), 1 and 3 (Linear) only")
        return {f"model.multi_modal_projector.{_PROJECTOR_LAYERS[match.group(1)]}.{match.group(2)}": tensor}
    if name.startswith("language_model."):
        if layout.text_arch == "internlm2":
            return _internlm2(name, tensor, layout)
        return _hf_text(name, tensor)
    raise UnconvertibleTensorError(f"{name}: not part of vision_model, mlp1 or language_model")


def _vision(name: str, tensor: torch.Tensor, layout: WeightLayout) -> dict[str, torch.Tensor]:
    if name in _VISION_RENAMES:
        return {_VISION_RENAMES[name]: tensor}
    match = _VISION_LAYER.fullmatch(name)
    if not match:
        raise UnconvertibleTensorError(f"{name}: unknown InternViT tensor")
    prefix = f"{VISION}encoder.layer.{match.group(1)}."
    rest = match.group(2)
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = split_vision_qkv(tensor, layout)
        return {f"{prefix}attention.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v), strict=True)}
    if rest not in _VISION_LAYER_RENAMES:
        raise UnconvertibleTensorError(f"{name}: unknown InternViT layer tensor {rest!r}")
    return {prefix + _VISION_LAYER_RENAMES[rest]: tensor}


def _internlm2(name: str, tensor: torch.Tensor, layout: WeightLayout) -> dict[str, torch.Tensor]:
    if name == "language_model.model.tok_embeddings.weight":
        return {TEXT + "embed_tokens.weight": tensor}
    if name == "language_model.output.weight":
        return {"lm_head.weight": tensor}
    if name == "language_model.model.norm.weight":
        return {TEXT + "norm.weight": tensor}
    match = _INTERNLM2_LAYER.fullmatch(name)
    if not match:
        raise UnconvertibleTensorError(f"{name}: unknown InternLM2 tensor")
    prefix = f"{TEXT}layers.{match.group(1)}."
    rest = match.group(2)
    if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = split_internlm2_wqkv(tensor, layout)
        return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v), strict=True)}
    if rest not in _INTERNLM2_LAYER_RENAMES:
        raise UnconvertibleTensorError(f"{name}: unknown InternLM2 layer tensor {rest!r}")
    return {prefix + _INTERNLM2_LAYER_RENAMES[rest]: tensor}


def _hf_text(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Qwen2 / Phi-3 / Llama: the original wraps transformers' own classes, so only prefixes move."""
    if name == "language_model.lm_head.weight":
        return {"lm_head.weight": tensor}
    if name.startswith("language_model.model."):
        return {TEXT + name[len("language_model.model.") :]: tensor}
    raise UnconvertibleTensorError(f"{name}: unknown text-model tensor")


def tied_lm_head(names: set[str]) -> bool:
    """True when the converted set lacks ``lm_head`` but has the embeddings to copy it from."""
    return "lm_head.weight" not in names and TEXT + "embed_tokens.weight" in names
