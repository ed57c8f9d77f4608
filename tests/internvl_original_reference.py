"""An independent forward pass of original-layout InternVL checkpoints, in plain torch.

Written from the original layer definitions (InternViT, ``mlp1``, pixel shuffle v2, InternLM2 with
its fused per-group ``wqkv``, Qwen2, Phi-3 with ``su`` RoPE, Llama) and reading the original tensor
names directly. It shares no code with ``lmms_sgl.checkpoints.internvl_original``, so agreement between the
two is evidence that the conversion is exact, not that one bug was written twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def load_original(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((folder / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return config, weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


# -- InternViT ------------------------------------------------------------------------------------
def vit_norm(x: torch.Tensor, w: dict, name: str, vc: dict) -> torch.Tensor:
    if vc["norm_type"] == "rms_norm":
        return rms_norm(x, w[name + ".weight"], vc["layer_norm_eps"])
    return F.layer_norm(x, (x.shape[-1],), w[name + ".weight"], w[name + ".bias"], vc["layer_norm_eps"])


def vit_attention(x: torch.Tensor, w: dict, p: str, vc: dict) -> torch.Tensor:
    b, n, c = x.shape
    heads = vc["num_attention_heads"]
    qkv = linear(x, w, p + "attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if vc["qk_normalization"]:
        # the original normalises over all heads at once (hidden_size), then splits again
        q = rms_norm(q.transpose(1, 2).flatten(-2), w[p + "attn.q_norm.weight"], vc["layer_norm_eps"])
        k = rms_norm(k.transpose(1, 2).flatten(-2), w[p + "attn.k_norm.weight"], vc["layer_norm_eps"])
        q = q.view(b, n, heads, c // heads).transpose(1, 2)
        k = k.view(b, n, heads, c // heads).transpose(1, 2)
    scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return linear(out, w, p + "attn.proj")


def vit_forward(config: dict, w: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """Hidden states of InternViT at ``select_layer`` (all tokens, CLS first)."""
    vc = config["vision_config"]
    patch = vc["patch_size"]
    x = F.conv2d(
        pixel_values,
        w["vision_model.embeddings.patch_embedding.weight"],
        w["vision_model.embeddings.patch_embedding.bias"],
        stride=patch,
    )
    b, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = w["vision_model.embeddings.class_embedding"].expand(b, 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = w["vision_model.embeddings.position_embedding"]
    grid = vc["image_size"] // patch
    patch_pos = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.reshape(1, -1, gh * gw).permute(0, 2, 1)
    x = x + torch.cat([pos[:, :1], patch_pos], dim=1)
    states = [x]
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        x = x + vit_attention(vit_norm(x, w, p + "norm1", vc), w, p, vc) * w[p + "ls1"]
        hidden = F.gelu(linear(vit_norm(x, w, p + "norm2", vc), w, p + "mlp.fc1"))
        x = x + linear(hidden, w, p + "mlp.fc2") * w[p + "ls2"]
        states.append(x)
    return x if config["select_layer"] == -1 else states[config["select_layer"]]


def pixel_shuffle_v2(x: torch.Tensor, scale: float) -> torch.Tensor:
    n, width, height, c = x.shape
    x = x.view(n, width, int(height * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(height * scale), int(width * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def image_features(config: dict, w: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    feats = vit_forward(config, w, pixel_values)[:, 1:, :]
    side = int(feats.shape[1] ** 0.5)
    feats = feats.reshape(feats.shape[0], side, side, -1)
    feats = pixel_shuffle_v2(feats, config["downsample_ratio"])
    feats = feats.reshape(feats.shape[0], -1, feats.shape[-1])
    feats = F.layer_norm(feats, (feats.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"])
    feats = F.gelu(linear(feats, w, "mlp1.1"))
    return linear(feats, w, "mlp1.3")


# -- text models ----------------------------------------------------------------------------------
def rope_cos_sin(llm: dict, arch: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    dim = llm["hidden_size"] // llm["num_attention_heads"]
    base = float(llm.get("rope_theta", 10000.0))
    scaling = llm.get("rope_scaling") or {}
    kind = scaling.get("type")
    exponents = torch.arange(0, dim, 2).float() / dim
    attention_scale = 1.0
    if kind == "dynamic" and seq_len > llm["max_position_embeddings"]:
        # InternLM2's NTK-aware dynamic scaling: a larger base once the sequence outgrows the table
        factor, max_pos = scaling["factor"], llm["max_position_embeddings"]
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    if kind == "su":
        original = llm["original_max_position_embeddings"]
        ext = torch.tensor(
            scaling["long_factor" if seq_len > original else "short_factor"], dtype=torch.float32
        )
        inv_freq = 1.0 / (ext * base**exponents)
        scale = llm["max_position_embeddings"] / original
        if scale > 1.0:
            attention_scale = math.sqrt(1 + math.log(scale) / math.log(original))
    else:
        inv_freq = 1.0 / (base**exponents)
    t = torch.arange(seq_len).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_scale, emb.sin() * attention_scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qkv_heads(llm: dict, arch: str, x: torch.Tensor, w: dict, p: str):
    """Query heads (b, heads, L, d) and key/value heads (b, kv, L, d) as each original model makes them."""
    b, length, hidden = x.shape
    heads = llm["num_attention_heads"]
    kv = llm.get("num_key_value_heads") or heads
    d = hidden // heads
    if arch == "internlm2":
        groups = heads // kv
        fused = linear(x, w, p + "attention.wqkv").view(b, length, kv, groups + 2, d)
        q = fused[..., :groups, :].reshape(b, length, heads, d)
        k, v = fused[..., -2, :], fused[..., -1, :]
    elif arch == "phi3":
        fused = linear(x, w, p + "self_attn.qkv_proj")
        q, k, v = fused.split([heads * d, kv * d, kv * d], dim=-1)
        q, k, v = q.view(b, length, heads, d), k.view(b, length, kv, d), v.view(b, length, kv, d)
    else:
        q = linear(x, w, p + "self_attn.q_proj").view(b, length, heads, d)
        k = linear(x, w, p + "self_attn.k_proj").view(b, length, kv, d)
        v = linear(x, w, p + "self_attn.v_proj").view(b, length, kv, d)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def text_names(arch: str) -> dict[str, str]:
    if arch == "internlm2":
        return {
            "embed": "language_model.model.tok_embeddings.weight",
            "head": "language_model.output.weight",
            "in_norm": "attention_norm.weight",
            "post_norm": "ffn_norm.weight",
            "o": "attention.wo",
        }
    return {
        "embed": "language_model.model.embed_tokens.weight",
        "head": "language_model.lm_head.weight",
        "in_norm": "input_layernorm.weight",
        "post_norm": "post_attention_layernorm.weight",
        "o": "self_attn.o_proj",
    }


def mlp(arch: str, x: torch.Tensor, w: dict, p: str) -> torch.Tensor:
    if arch == "internlm2":
        return linear(
            F.silu(linear(x, w, p + "feed_forward.w1")) * linear(x, w, p + "feed_forward.w3"),
            w,
            p + "feed_forward.w2",
        )
    if arch == "phi3":
        gate, up = linear(x, w, p + "mlp.gate_up_proj").chunk(2, dim=-1)
        return linear(up * F.silu(gate), w, p + "mlp.down_proj")
    return linear(
        F.silu(linear(x, w, p + "mlp.gate_proj")) * linear(x, w, p + "mlp.up_proj"), w, p + "mlp.down_proj"
    )


def text_forward(llm: dict, arch: str, w: dict, embeds: torch.Tensor) -> torch.Tensor:
    names = text_names(arch)
    b, length, hidden = embeds.shape
    heads = llm["num_attention_heads"]
    kv = llm.get("num_key_value_heads") or heads
    d = hidden // heads
    cos, sin = rope_cos_sin(llm, arch, length)
    causal = torch.full((length, length), float("-inf")).triu(1)
    eps = llm["rms_norm_eps"]
    x = embeds
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        h = rms_norm(x, w[p + names["in_norm"]], eps)
        q, k, v = qkv_heads(llm, arch, h, w, p)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(heads // kv, dim=1)  # query head j uses key/value head j // groups
        v = v.repeat_interleave(heads // kv, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d) + causal
        out = (scores.float().softmax(-1).to(q.dtype) @ v).transpose(1, 2).reshape(b, length, hidden)
        x = x + linear(out, w, p + names["o"])
        x = x + mlp(arch, rms_norm(x, w[p + names["post_norm"]], eps), w, p)
    x = rms_norm(x, w["language_model.model.norm.weight"], eps)
    head = w.get(names["head"], w[names["embed"]])  # Qwen2 may tie the head to the embeddings
    return x @ head.T


ARCHS = {
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
    "LlamaForCausalLM": "llama",
}


@torch.no_grad()
def reference_logits(
    config: dict, w: dict, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_token_id: int
) -> torch.Tensor:
    """Logits of the original model for one prompt whose image tokens are ``image_token_id``."""
    llm = config["llm_config"]
    arch = ARCHS[llm["architectures"][0]]
    embeds = w[text_names(arch)["embed"]][input_ids]
    if pixel_values is not None:
        feats = image_features(config, w, pixel_values)
        embeds = embeds.clone()
        embeds[input_ids == image_token_id] = feats.reshape(-1, feats.shape[-1])
    return text_forward(llm, arch, w, embeds)
