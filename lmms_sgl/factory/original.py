"""Offline factory of tiny InternVL checkpoints in the *original* (remote-code) layout.

The original InternVL2 repositories cannot be downloaded here, yet their conversion must be tested
against exactly their layout. This module writes small checkpoints the way those repositories are:
``config.json`` in the ``InternVLChatModel`` format (``llm_config``, ``vision_config``, ``template``,
``auto_map`` pointing at code that does not exist, so nothing could run it), weights under their
original names (InternLM2's fused ``wqkv``, InternViT's ``qkv`` / ``ls1`` / ``norm1``, ``mlp1``) as
seeded random fp32 safetensors split over two shards, and tokenizer files in the text model's
original layout (``lmms_sgl.factory.original_tokenizers.write_tokenizer``).

Text models: InternLM2 (grouped KV heads, dynamic RoPE scaling), Qwen2 (tied embeddings), Phi-3
(``su`` RoPE scaling), Llama. Vision: InternViT-300M style (LayerNorm, qkv bias) and InternViT-6B
style (RMSNorm, query/key norm). Two builds are byte-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from lmms_sgl.checkpoints.internvl_original.tokenizer import TEXT_ARCHITECTURES
from lmms_sgl.factory.specs import TextSpec, VisionSpec

_ARCH_CLASS = {short: cls for cls, short in TEXT_ARCHITECTURES.items()}
_MODEL_TYPE = {"internlm2": "internlm2", "qwen2": "qwen2", "phi3": "phi3", "llama": "llama"}
_TEMPLATE = {"internlm2": "internlm2-chat", "qwen2": "Hermes-2", "phi3": "phi3-chat", "llama": "Hermes-2"}


@dataclass(frozen=True)
class OriginalSpec:
    """One tiny original-layout checkpoint."""

    name: str
    text_arch: str  # internlm2 | qwen2 | phi3 | llama
    vision: str  # "300m" (LayerNorm, qkv bias) | "6b" (RMSNorm, query/key norm, no qkv bias)
    text: TextSpec
    vision_dims: VisionSpec
    seed: int
    select_layer: int = -1
    max_position_embeddings: int = 512  # short, so a few tiles exceed it (dynamic / long RoPE)
    shards: int = 2

    @property
    def template(self) -> str:
        return _TEMPLATE[self.text_arch]


_SMALL_TEXT = TextSpec(64, 2, 4, 2, 96)
_SMALL_VISION = VisionSpec(32, 2, 2, 64)

SPECS: dict[str, OriginalSpec] = {
    spec.name: spec
    for spec in (
        # the SGL pair: InternVL2-2B-like guide, InternVL2-26B-like large (InternViT-6B style)
        OriginalSpec("internvl2-orig-guide", "internlm2", "300m", _SMALL_TEXT, _SMALL_VISION, seed=31),
        OriginalSpec(
            "internvl2-orig-large",
            "internlm2",
            "6b",
            TextSpec(128, 4, 8, 2, 192),
            VisionSpec(48, 2, 3, 96),
            seed=32,
        ),
        OriginalSpec(
            "internvl2-orig-qwen2", "qwen2", "300m", _SMALL_TEXT, _SMALL_VISION, seed=33, select_layer=-2
        ),
        OriginalSpec(
            "internvl2-orig-phi3", "phi3", "300m", TextSpec(64, 2, 4, 4, 96), _SMALL_VISION, seed=34
        ),
        OriginalSpec("internvl2-orig-llama", "llama", "6b", _SMALL_TEXT, _SMALL_VISION, seed=35),
    )
}
PAIR = {"guide": "internvl2-orig-guide", "large": "internvl2-orig-large"}


# -- config.json ------------------------------------------------------------------------------
def _tokenizer_facts(folder: Path, spec: OriginalSpec) -> dict:
    """Vocabulary size and special ids of the tokenizer written for ``spec`` (original ids)."""
    from lmms_sgl.checkpoints.internvl_original.tokenizer import build_tokenizer

    minimal = {"llm_config": {"architectures": [_ARCH_CLASS[spec.text_arch]]}, "template": spec.template}
    tokenizer = build_tokenizer(folder, minimal)
    largest = max(tokenizer.get_vocab().values())
    return {
        "vocab_size": (largest + 1 + 15) // 16 * 16,  # padded like real embeddings (e.g. Phi-3's 32064)
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llm_config(spec: OriginalSpec, facts: dict) -> dict:
    t = spec.text
    config = {
        "_name_or_path": f"tiny-{spec.text_arch}",
        "architectures": [_ARCH_CLASS[spec.text_arch]],
        "model_type": _MODEL_TYPE[spec.text_arch],
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5 if spec.text_arch in ("internlm2", "phi3") else 1e-6,
        "tie_word_embeddings": spec.text_arch == "qwen2",
        "torch_dtype": "float32",
        "use_cache": True,
        **facts,
    }
    if spec.text_arch == "internlm2":
        config.update(
            bias=False,
            rope_theta=1000000,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            attn_implementation="eager",
            auto_map={
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            },
        )
    elif spec.text_arch == "qwen2":
        config.update(
            rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768, max_window_layers=21
        )
    elif spec.text_arch == "phi3":
        half = t.hidden_size // t.num_attention_heads // 2
        config.update(
            rope_theta=10000.0,
            original_max_position_embeddings=spec.max_position_embeddings * 3 // 4,
            sliding_window=2 * spec.max_position_embeddings,
            rope_scaling={
                "type": "su",
                "short_factor": [round(1.0 + 0.05 * i, 4) for i in range(half)],
                "long_factor": [round(1.0 + 0.75 * i, 4) for i in range(half)],
            },
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            attention_dropout=0.0,
        )
    else:
        config.update(rope_theta=5000000.0, rope_scaling=None, attention_bias=False, pretraining_tp=1)
    return config


def _vision_config(spec: OriginalSpec) -> dict:
    v, big = spec.vision_dims, spec.vision == "6b"
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": v.hidden_size,
        "image_size": 448,
        "initializer_factor": 0.1 if big else 1.0,
        "initializer_range": 1e-10 if big else 0.02,
        "intermediate_size": v.intermediate_size,
        "layer_norm_eps": 1e-6,
        "norm_type": "rms_norm" if big else "layer_norm",
        "num_attention_heads": v.num_attention_heads,
        "num_channels": 3,
        "num_hidden_layers": v.num_hidden_layers,
        "patch_size": 14,
        "qk_normalization": big,
        "qkv_bias": not big,
        "use_flash_attn": True,
    }


def original_config(spec: OriginalSpec, facts: dict) -> dict:
    """A ``config.json`` shaped like the released InternVL2 ones."""
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "llm_config": _llm_config(spec, facts),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": spec.select_layer,
        "template": spec.template,
        "torch_dtype": "float32",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": _vision_config(spec),
    }


# -- weights ----------------------------------------------------------------------------------
class _Init:
    """Seeded tensors: linear weights ~ N(0, 1/fan_in), norms near 1, biases small."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std

    def linear(self, out: int, inp: int) -> torch.Tensor:
        return self.normal(out, inp, std=inp**-0.5)

    def norm(self, size: int) -> torch.Tensor:
        return 1.0 + self.normal(size, std=0.1)

    def bias(self, size: int) -> torch.Tensor:
        return self.normal(size, std=0.05)


def vision_weights(spec: OriginalSpec, init: _Init) -> dict[str, torch.Tensor]:
    v, big = spec.vision_dims, spec.vision == "6b"
    d, grid = v.hidden_size, 448 // 14
    w = {
        "vision_model.embeddings.class_embedding": init.normal(1, 1, d, std=0.5),
        "vision_model.embeddings.patch_embedding.weight": init.normal(
            d, 3, 14, 14, std=(3 * 14 * 14) ** -0.5
        ),
        "vision_model.embeddings.patch_embedding.bias": init.bias(d),
        "vision_model.embeddings.position_embedding": init.normal(1, grid * grid + 1, d, std=0.5),
    }
    for i in range(v.num_hidden_layers):
        p = f"vision_model.encoder.layers.{i}."
        w[p + "attn.qkv.weight"] = init.linear(3 * d, d)
        if not big:
            w[p + "attn.qkv.bias"] = init.bias(3 * d)
        w[p + "attn.proj.weight"] = init.linear(d, d)
        w[p + "attn.proj.bias"] = init.bias(d)
        if big:
            w[p + "attn.q_norm.weight"] = init.norm(d)
            w[p + "attn.k_norm.weight"] = init.norm(d)
        w[p + "ls1"] = 0.5 + init.normal(d, std=0.1)
        w[p + "ls2"] = 0.5 + init.normal(d, std=0.1)
        for norm in ("norm1", "norm2"):
            w[p + f"{norm}.weight"] = init.norm(d)
            if not big:
                w[p + f"{norm}.bias"] = init.bias(d)
        w[p + "mlp.fc1.weight"] = init.linear(v.intermediate_size, d)
        w[p + "mlp.fc1.bias"] = init.bias(v.intermediate_size)
        w[p + "mlp.fc2.weight"] = init.linear(d, v.intermediate_size)
        w[p + "mlp.fc2.bias"] = init.bias(d)
    shuffled, hidden = 4 * d, spec.text.hidden_size
    w["mlp1.0.weight"] = init.norm(shuffled)
    w["mlp1.0.bias"] = init.bias(shuffled)
    w["mlp1.1.weight"] = init.linear(hidden, shuffled)
    w["mlp1.1.bias"] = init.bias(hidden)
    w["mlp1.3.weight"] = init.linear(hidden, hidden)
    w["mlp1.3.bias"] = init.bias(hidden)
    return w


def text_weights(spec: OriginalSpec, vocab: int, init: _Init) -> dict[str, torch.Tensor]:
    t, arch = spec.text, spec.text_arch
    h, inter = t.hidden_size, t.intermediate_size
    hd = h // t.num_attention_heads
    q_rows, kv_rows = t.num_attention_heads * hd, t.num_key_value_heads * hd
    w: dict[str, torch.Tensor] = {}
    if arch == "internlm2":
        w["language_model.model.tok_embeddings.weight"] = init.normal(vocab, h, std=1.0)
        w["language_model.output.weight"] = init.linear(vocab, h)
    else:
        # tied (qwen2): the head reuses these rows, so keep logits O(1) like the untied heads
        w["language_model.model.embed_tokens.weight"] = init.normal(
            vocab, h, std=h**-0.5 if arch == "qwen2" else 1.0
        )
        if arch != "qwen2":  # qwen2: tied embeddings, no lm_head tensor
            w["language_model.lm_head.weight"] = init.linear(vocab, h)
    w["language_model.model.norm.weight"] = init.norm(h)
    for i in range(t.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        if arch == "internlm2":
            w[p + "attention.wqkv.weight"] = init.linear(q_rows + 2 * kv_rows, h)
            w[p + "attention.wo.weight"] = init.linear(h, q_rows)
            w[p + "feed_forward.w1.weight"] = init.linear(inter, h)
            w[p + "feed_forward.w3.weight"] = init.linear(inter, h)
            w[p + "feed_forward.w2.weight"] = init.linear(h, inter)
            w[p + "attention_norm.weight"] = init.norm(h)
            w[p + "ffn_norm.weight"] = init.norm(h)
            continue
        if arch == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = init.linear(q_rows + 2 * kv_rows, h)
            w[p + "mlp.gate_up_proj.weight"] = init.linear(2 * inter, h)
        else:
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                w[p + f"self_attn.{name}.weight"] = init.linear(rows, h)
                if arch == "qwen2":
                    w[p + f"self_attn.{name}.bias"] = init.bias(rows)
            w[p + "mlp.gate_proj.weight"] = init.linear(inter, h)
            w[p + "mlp.up_proj.weight"] = init.linear(inter, h)
        w[p + "self_attn.o_proj.weight"] = init.linear(h, q_rows)
        w[p + "mlp.down_proj.weight"] = init.linear(h, inter)
        w[p + "input_layernorm.weight"] = init.norm(h)
        w[p + "post_attention_layernorm.weight"] = init.norm(h)
    return w


def _write_shards(weights: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """Sharded safetensors + index, split in name order (a layer may straddle two shards, as in
    the released checkpoints)."""
    from safetensors.torch import save_file

    names = sorted(weights)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        chunk = {n: weights[n].contiguous() for n in names[i * per : (i + 1) * per]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(chunk, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_original(spec: OriginalSpec, out_dir: Path) -> Path:
    """Write one tiny original-layout checkpoint to ``out_dir / spec.name``."""
    from lmms_sgl.factory.original_tokenizers import write_tokenizer

    folder = Path(out_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, spec.text_arch)
    facts = _tokenizer_facts(folder, spec)
    config = original_config(spec, facts)
    (folder / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    )
    init = _Init(spec.seed)
    weights = {**vision_weights(spec, init), **text_weights(spec, facts["vocab_size"], init)}
    _write_shards(weights, folder, spec.shards)
    logger.info(
        f"built original-layout {spec.name} ({spec.text_arch} text, InternViT-{spec.vision}) -> {folder}"
    )
    return folder


def build_originals(out_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    unknown = sorted(set(names or []) - set(SPECS))
    if unknown:
        raise ValueError(f"unknown original-layout spec(s) {unknown}; allowed: {sorted(SPECS)}")
    return {name: build_original(SPECS[name], out_dir) for name in names or list(SPECS)}


def build_original_pair(out_dir: Path) -> dict[str, Path]:
    """The guide/large pair for end-to-end runs: ``{"guide": path, "large": path}`` (InternLM2 text,
    256 visual tokens per 448 px tile in both, InternViT-300M style guide, InternViT-6B style large)."""
    return {role: build_original(SPECS[name], out_dir) for role, name in PAIR.items()}
