"""Recognise the original InternVL (``InternVLChatModel``) layout and translate its config.

The original InternVL2 / 2.5 / 3 repositories ship their own model code (``trust_remote_code``),
which lmms-sgl never runs. Their ``config.json`` still says everything needed to build the
transformers-native ``InternVLConfig``: a vision tower (InternViT-300M with LayerNorm or InternViT-6B
with RMSNorm and query/key norm), the ``mlp1`` projector, pixel shuffle, and a text model (InternLM2,
Qwen2, Phi-3 or Llama). Only ``config.json`` is read here, so a bad checkpoint is refused before any
weights load; every refusal names the field, its value and what is allowed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_sgl.checkpoints.integrity import CheckpointError
from lmms_sgl.checkpoints.internvl_original.templates import FORMATS

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
ORIGINAL_MODEL_TYPE = "internvl_chat"

# llm_config.architectures[0] -> our short name for the text model
TEXT_ARCHITECTURES = {
    "InternLM2ForCausalLM": "internlm2",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
    "LlamaForCausalLM": "llama",
}

TOP_LEVEL_FIELDS = (
    "llm_config",
    "vision_config",
    "template",
    "downsample_ratio",
    "ps_version",
    "select_layer",
    "force_image_size",
    "max_dynamic_patch",
    "use_thumbnail",
)
VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "image_size",
    "patch_size",
    "qkv_bias",
    "qk_normalization",
    "norm_type",
    "layer_norm_eps",
    "hidden_act",
)
TEXT_FIELDS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
)
# Rope scaling each text model's original code computes exactly as transformers does.
ROPE_SCALING_ALLOWED = {
    "internlm2": (None, "dynamic"),
    "qwen2": (None,),
    "phi3": (None, "su", "longrope"),
    "llama": (None, "linear", "dynamic", "llama3"),
}
# The transformers vision tower hard-codes eps 1e-6 in its query/key RMSNorm.
QK_NORM_EPS = 1e-6


class OriginalCheckpointError(CheckpointError):
    """An original-layout InternVL checkpoint that cannot be served exactly; the message says why."""


@dataclass(frozen=True)
class OriginalInternVL:
    """A validated original-layout config: what conversion and fail-fast checks need."""

    source: str  # the path or hub id as given
    argument: str  # the model argument it came from (e.g. ``pretrained``), for messages
    raw: dict  # config.json as read

    @property
    def llm(self) -> dict:
        return self.raw["llm_config"]

    @property
    def vision(self) -> dict:
        return self.raw["vision_config"]

    @property
    def text_arch(self) -> str:
        return TEXT_ARCHITECTURES[self.llm["architectures"][0]]

    @property
    def num_layers(self) -> int:
        """Decoder layers of the text model (what SGL's prune layer K is a fraction of)."""
        return int(self.llm["num_hidden_layers"])

    @property
    def template(self) -> str:
        return self.raw["template"]

    @property
    def image_size(self) -> int:
        return int(self.raw["force_image_size"] or self.vision["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision["patch_size"])

    @property
    def downsample_ratio(self) -> float:
        return float(self.raw["downsample_ratio"])

    @property
    def image_seq_length(self) -> int:
        """Visual tokens per tile after pixel shuffle (256 for 448 px, patch 14, ratio 0.5)."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def max_dynamic_patch(self) -> int:
        return int(self.raw["max_dynamic_patch"])

    @property
    def use_thumbnail(self) -> bool:
        return bool(self.raw["use_thumbnail"])

    @property
    def vision_variant(self) -> str:
        """``layer_norm`` (InternViT-300M family) or ``rms_norm`` (InternViT-6B family)."""
        return self.vision["norm_type"]

    @property
    def name(self) -> str:
        return Path(self.source.rstrip("/")).name or "checkpoint"

    def describe(self) -> str:
        return (
            f"original InternVL ({self.text_arch} text, {self.num_layers} layers; InternViT "
            f"{self.vision['num_hidden_layers']}x{self.vision['hidden_size']} {self.vision_variant}; "
            f"template {self.template!r})"
        )

    # -- transformers configs ----------------------------------------------------------------
    def text_config(self):
        """The transformers config of the text model (InternLM2 becomes Llama)."""
        return _text_config(self.llm, self.text_arch)

    def vision_config(self):
        from transformers import InternVLVisionConfig

        v = self.vision
        return InternVLVisionConfig(
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_attention_heads=int(v["num_attention_heads"]),
            num_hidden_layers=int(v["num_hidden_layers"]),
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=int(v.get("num_channels", 3)),
            attention_bias=bool(v["qkv_bias"]),
            use_qk_norm=bool(v["qk_normalization"]),
            norm_type=v["norm_type"],
            layer_norm_eps=float(v["layer_norm_eps"]),
            hidden_act=v["hidden_act"],
            use_mean_pooling=True,  # no final norm after the encoder, as in InternViT
            use_mask_token=False,
            use_absolute_position_embeddings=True,
        )

    def transformers_config(self, image_token_id: int, dtype: str | None = None):
        """The ``InternVLConfig`` (model_type ``internvl``) that serves this checkpoint."""
        from transformers import InternVLConfig

        config = InternVLConfig(
            vision_config=self.vision_config(),
            text_config=self.text_config(),
            image_token_id=int(image_token_id),
            image_seq_length=self.image_seq_length,
            downsample_ratio=self.downsample_ratio,
            projector_hidden_act="gelu",  # mlp1 is LayerNorm, Linear, nn.GELU(), Linear
            vision_feature_layer=int(self.raw["select_layer"]),
            vision_feature_select_strategy="default",  # drop the CLS token, as the original does
            tie_word_embeddings=False,
        )
        if dtype is not None:
            config.dtype = dtype
        return config


# -- reading ----------------------------------------------------------------------------------
def is_original_layout(raw: dict) -> bool:
    return raw.get("model_type") == ORIGINAL_MODEL_TYPE or ORIGINAL_ARCHITECTURE in (
        raw.get("architectures") or []
    )


def config_path(path_or_hub_id: str) -> Path | None:
    """``config.json`` of a local folder, or of a hub id (from the hub cache when offline); None if
    it cannot be found (the family's own checks then report the unreadable checkpoint)."""
    local = Path(path_or_hub_id)
    if local.is_dir():
        file = local / "config.json"
        return file if file.is_file() else None
    if local.exists() or path_or_hub_id.count("/") != 1:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(hf_hub_download(path_or_hub_id, "config.json"))
    except (OSError, HFValidationError, ValueError):
        return None


def read_original_config(path_or_hub_id: str | Path, argument: str = "pretrained") -> OriginalInternVL | None:
    """Validate an original-layout checkpoint from its ``config.json`` alone.

    Returns None when the checkpoint is not original layout (or its config cannot be found), so
    the caller's normal path handles it; raises :class:`OriginalCheckpointError` for an original
    checkpoint that cannot be served exactly.
    """
    source = str(path_or_hub_id)
    file = config_path(source)
    if file is None:
        return None
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OriginalCheckpointError(f"{argument}={source!r}: unreadable {file.name} ({error})") from None
    if not isinstance(raw, dict) or not is_original_layout(raw):
        return None
    original = OriginalInternVL(source=source, argument=argument, raw=raw)
    validate(original)
    return original


# -- validation -------------------------------------------------------------------------------
def _fail(original: OriginalInternVL, field: str, value: Any, allowed: str) -> OriginalCheckpointError:
    return OriginalCheckpointError(
        f"{original.argument}={original.source!r} (original InternVL layout): config.json field "
        f"{field} = {value!r} cannot be served; allowed: {allowed}"
    )


def _missing(original: OriginalInternVL, section: dict, fields: tuple[str, ...], prefix: str) -> None:
    for name in fields:
        if name not in section:
            raise OriginalCheckpointError(
                f"{original.argument}={original.source!r} (original InternVL layout): config.json lacks "
                f"the field {prefix}{name}, which the conversion needs"
            )


def validate(original: OriginalInternVL) -> None:
    """Refuse anything the transformers-native model would not compute exactly as the original."""
    raw = original.raw
    architectures = raw.get("architectures")
    if architectures != [ORIGINAL_ARCHITECTURE]:
        raise _fail(original, "architectures", architectures, f"[{ORIGINAL_ARCHITECTURE!r}]")
    _missing(original, raw, TOP_LEVEL_FIELDS, "")
    for name in ("llm_config", "vision_config"):
        if not isinstance(raw[name], dict):
            raise _fail(original, name, type(raw[name]).__name__, "a JSON object")
    llm, vision = raw["llm_config"], raw["vision_config"]
    _validate_top_level(original)
    _validate_vision(original, vision)
    _missing(original, llm, TEXT_FIELDS, "llm_config.")
    arch = llm["architectures"]
    if not isinstance(arch, list) or len(arch) != 1 or arch[0] not in TEXT_ARCHITECTURES:
        raise _fail(original, "llm_config.architectures", arch, f"one of {sorted(TEXT_ARCHITECTURES)}")
    _validate_text(original, llm, TEXT_ARCHITECTURES[arch[0]])
    try:  # transformers' own checks (rope parameters, head sizes) as a last line
        original.text_config()
        original.vision_config()
    except (ValueError, TypeError) as error:
        raise OriginalCheckpointError(
            f"{original.argument}={original.source!r} (original InternVL layout): its config does not "
            f"translate to transformers: {error}"
        ) from None


def _validate_top_level(original: OriginalInternVL) -> None:
    raw = original.raw
    if raw["ps_version"] != "v2":
        raise _fail(original, "ps_version", raw["ps_version"], "'v2' (pixel shuffle v1 transposes the grid)")
    ratio = raw["downsample_ratio"]
    if not isinstance(ratio, (int, float)) or ratio <= 0 or ratio > 1 or not float(1 / ratio).is_integer():
        raise _fail(original, "downsample_ratio", ratio, "1/n for an integer n (InternVL uses 0.5)")
    if not isinstance(raw["template"], str) or raw["template"] not in FORMATS:
        raise _fail(original, "template", raw["template"], f"one of {sorted(FORMATS)}")
    tiles = raw["max_dynamic_patch"]
    if not isinstance(tiles, int) or isinstance(tiles, bool) or tiles < 1:
        raise _fail(original, "max_dynamic_patch", tiles, "an integer >= 1")
    if not isinstance(raw["use_thumbnail"], bool):
        raise _fail(original, "use_thumbnail", raw["use_thumbnail"], "true or false")
    select = raw["select_layer"]
    layers = raw["vision_config"].get("num_hidden_layers")
    if not isinstance(select, int) or isinstance(select, bool):
        raise _fail(original, "select_layer", select, "an integer index into the vision hidden states")
    if isinstance(layers, int) and not -(layers + 1) <= select <= layers:
        raise _fail(original, "select_layer", select, f"an index in [{-(layers + 1)}, {layers}]")
    for lora in ("use_backbone_lora", "use_llm_lora"):
        if raw.get(lora):
            raise _fail(original, lora, raw[lora], "0 or absent (merge LoRA adapters before converting)")
    if raw.get("pad2square"):
        raise _fail(original, "pad2square", raw["pad2square"], "false or absent (InternVL2 tiling)")
    forced, native = raw["force_image_size"], raw["vision_config"].get("image_size")
    if forced is not None and forced != native:
        raise _fail(
            original,
            "force_image_size",
            forced,
            f"null or the vision tower's own image_size {native!r} (other sizes interpolate position "
            "embeddings, which transformers does differently)",
        )


def _validate_vision(original: OriginalInternVL, vision: dict) -> None:
    _missing(original, vision, VISION_FIELDS, "vision_config.")
    if vision["norm_type"] not in ("layer_norm", "rms_norm"):
        raise _fail(original, "vision_config.norm_type", vision["norm_type"], "'layer_norm' or 'rms_norm'")
    if vision["hidden_act"] != "gelu":
        raise _fail(original, "vision_config.hidden_act", vision["hidden_act"], "'gelu'")
    if vision["qk_normalization"] and not math.isclose(vision["layer_norm_eps"], QK_NORM_EPS, rel_tol=0):
        raise _fail(
            original,
            "vision_config.layer_norm_eps",
            vision["layer_norm_eps"],
            f"{QK_NORM_EPS} when qk_normalization is true (transformers' query/key norm uses that eps)",
        )
    size, patch = vision["image_size"], vision["patch_size"]
    if not all(isinstance(x, int) and x > 0 for x in (size, patch)) or size % patch:
        raise _fail(original, "vision_config.patch_size", patch, f"a positive divisor of image_size {size!r}")
    grid = size // patch
    shuffle = round(1 / original.raw["downsample_ratio"])
    if grid % shuffle:
        raise _fail(
            original,
            "downsample_ratio",
            original.raw["downsample_ratio"],
            f"a ratio whose inverse divides the {grid}x{grid} patch grid",
        )
    if vision["hidden_size"] % vision["num_attention_heads"]:
        raise _fail(
            original,
            "vision_config.num_attention_heads",
            vision["num_attention_heads"],
            f"a divisor of hidden_size {vision['hidden_size']}",
        )


def _rope_type(llm: dict) -> str | None:
    scaling = llm.get("rope_scaling")
    if scaling is None:
        return None
    return scaling.get("type", scaling.get("rope_type"))


def _validate_text(original: OriginalInternVL, llm: dict, arch: str) -> None:
    if llm.get("hidden_act", "silu") != "silu":
        raise _fail(original, "llm_config.hidden_act", llm.get("hidden_act"), "'silu'")
    scaling = llm.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise _fail(original, "llm_config.rope_scaling", scaling, "null or a JSON object")
    rope = _rope_type(llm)
    if rope not in ROPE_SCALING_ALLOWED[arch]:
        raise _fail(
            original,
            "llm_config.rope_scaling",
            scaling,
            f"for {arch}: rope scaling type in {list(ROPE_SCALING_ALLOWED[arch])}",
        )
    if rope in ("dynamic", "linear") and not isinstance(scaling.get("factor"), (int, float)):
        raise _fail(original, "llm_config.rope_scaling.factor", scaling.get("factor"), "a number")
    heads = llm["num_attention_heads"]
    kv = llm.get("num_key_value_heads") or heads
    if heads % kv:
        raise _fail(
            original, "llm_config.num_key_value_heads", kv, f"a divisor of num_attention_heads {heads}"
        )
    if arch == "internlm2":
        if llm["hidden_size"] % heads:
            raise _fail(original, "llm_config.num_attention_heads", heads, "a divisor of hidden_size")
        if llm.get("tie_word_embeddings", False):
            raise _fail(
                original, "llm_config.tie_word_embeddings", True, "false (InternLM2 has its own output)"
            )
    if arch == "qwen2" and llm.get("use_sliding_window", False):
        raise _fail(original, "llm_config.use_sliding_window", True, "false")
    if arch == "phi3":
        window = llm.get("sliding_window")
        if window is not None and window < llm["max_position_embeddings"]:
            raise _fail(
                original,
                "llm_config.sliding_window",
                window,
                f"null or >= max_position_embeddings {llm['max_position_embeddings']} (the original eager "
                "and flash-attention paths disagree on shorter windows)",
            )
        if rope in ("su", "longrope"):
            for name in ("short_factor", "long_factor"):
                if not isinstance(scaling.get(name), list):
                    raise _fail(original, f"llm_config.rope_scaling.{name}", scaling.get(name), "a list")
    if llm.get("partial_rotary_factor", 1.0) != 1.0:
        raise _fail(original, "llm_config.partial_rotary_factor", llm["partial_rotary_factor"], "1.0")


# -- text configs -----------------------------------------------------------------------------
def _common_text(llm: dict) -> dict:
    heads = int(llm["num_attention_heads"])
    return {
        "vocab_size": int(llm["vocab_size"]),
        "hidden_size": int(llm["hidden_size"]),
        "intermediate_size": int(llm["intermediate_size"]),
        "num_hidden_layers": int(llm["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(llm.get("num_key_value_heads") or heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(llm["max_position_embeddings"]),
        "rms_norm_eps": float(llm["rms_norm_eps"]),
        "bos_token_id": llm.get("bos_token_id"),
        "eos_token_id": llm.get("eos_token_id"),
        "pad_token_id": llm.get("pad_token_id"),
        "tie_word_embeddings": False,  # the converter always writes lm_head explicitly
    }


def _rope_parameters(llm: dict, default_theta: float) -> dict:
    theta = float(llm.get("rope_theta", default_theta))
    scaling = llm.get("rope_scaling")
    rope = _rope_type(llm)
    if rope is None:
        return {"rope_type": "default", "rope_theta": theta}
    if rope in ("dynamic", "linear"):
        return {"rope_type": rope, "factor": float(scaling["factor"]), "rope_theta": theta}
    if rope in ("su", "longrope"):
        original_max = llm.get("original_max_position_embeddings", llm["max_position_embeddings"])
        return {
            "rope_type": "longrope",
            "factor": llm["max_position_embeddings"] / original_max,  # the original's scale
            "short_factor": [float(x) for x in scaling["short_factor"]],
            "long_factor": [float(x) for x in scaling["long_factor"]],
            "rope_theta": theta,
        }
    parameters = {k: v for k, v in scaling.items() if k != "type"}  # llama3: transformers' own maths
    return {**parameters, "rope_type": rope, "rope_theta": theta}


def _text_config(llm: dict, arch: str):
    from transformers import LlamaConfig, Phi3Config, Qwen2Config

    common = _common_text(llm)
    if arch == "internlm2":
        # InternLM2 is Llama with fused weights; bias covers wqkv and wo, like Llama's attention_bias.
        return LlamaConfig(
            **common,
            rope_parameters=_rope_parameters(llm, 10000.0),
            attention_bias=bool(llm.get("bias", False)),
            mlp_bias=False,
        )
    if arch == "qwen2":
        return Qwen2Config(
            **common,
            rope_parameters=_rope_parameters(llm, 10000.0),
            use_sliding_window=False,
        )
    if arch == "phi3":
        return Phi3Config(
            **common,
            rope_parameters=_rope_parameters(llm, 10000.0),
            original_max_position_embeddings=int(
                llm.get("original_max_position_embeddings", llm["max_position_embeddings"])
            ),
            sliding_window=None,  # validated: absent or longer than any sequence
        )
    return LlamaConfig(
        **common,
        rope_parameters=_rope_parameters(llm, 10000.0),
        attention_bias=bool(llm.get("attention_bias", False)),
        mlp_bias=bool(llm.get("mlp_bias", False)),
        head_dim=llm.get("head_dim"),
    )
