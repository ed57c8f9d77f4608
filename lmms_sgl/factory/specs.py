"""The small checkpoints the offline factory builds: sizes, roles and seeds, one spec each.

Plain data (no torch, no transformers), so the proving ground and benchmarks can describe their
own models with the same dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class ModelSpec:
    """One small checkpoint: its family, its role in an SGL pair and its sizes."""

    name: str
    family: str  # "internvl", "llava" or "qwen_vl"
    role: str  # "guide" or "large"
    text: TextSpec
    vision: VisionSpec
    seed: int
    max_patches: int = 6  # InternVL dynamic tiling: tiles besides the thumbnail
    # llava: "default" (LLaVA-1.5) | "next" (LLaVA-NeXT) | "onevision" | "onevision_video" (OneVision
    # whose tokenizer has the <video> token and whose video processor matches the 112 px tower);
    # qwen_vl: "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    variant: str = "default"

    @property
    def description(self) -> str:
        return (
            f"{self.family} {self.role}: text {self.text.num_hidden_layers}x{self.text.hidden_size} "
            f"({self.text.num_attention_heads} heads, {self.text.num_key_value_heads} kv), "
            f"vision {self.vision.num_hidden_layers}x{self.vision.hidden_size}"
        )


SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "internvl-guide",
            "internvl",
            "guide",
            TextSpec(64, 2, 4, 2, 128),
            VisionSpec(32, 1, 2, 64),
            seed=11,
        ),
        ModelSpec(
            "internvl-large",
            "internvl",
            "large",
            TextSpec(128, 4, 8, 2, 256),
            VisionSpec(64, 2, 4, 128),
            seed=12,
        ),
        ModelSpec(
            "llava-guide",
            "llava",
            "guide",
            TextSpec(64, 2, 4, 2, 128),
            VisionSpec(32, 1, 2, 64),
            seed=21,
        ),
        ModelSpec(
            "llava-large",
            "llava",
            "large",
            TextSpec(128, 4, 8, 2, 256),
            VisionSpec(64, 2, 4, 128),
            seed=22,
        ),
        ModelSpec(
            "llava-ov-guide",
            "llava",
            "guide",
            TextSpec(64, 2, 4, 2, 128),
            VisionSpec(32, 1, 2, 64),
            seed=23,
            variant="onevision",
        ),
        ModelSpec(
            "llava-ov-large",
            "llava",
            "large",
            TextSpec(128, 4, 8, 2, 256),
            VisionSpec(64, 2, 4, 128),
            seed=24,
            variant="onevision",
        ),
        ModelSpec(  # LLaVA-NeXT (CLIP with [CLS], anyres crops): the VisionZip family of the official code
            "llava-next-large",
            "llava",
            "large",
            TextSpec(128, 4, 8, 2, 256),
            VisionSpec(64, 2, 4, 128),
            seed=27,
            variant="next",
        ),
        ModelSpec(
            "llava-ov-video-guide",
            "llava",
            "guide",
            TextSpec(64, 2, 4, 2, 128),
            VisionSpec(32, 1, 2, 64),
            seed=25,
            variant="onevision_video",
        ),
        ModelSpec(
            "llava-ov-video-large",
            "llava",
            "large",
            TextSpec(128, 4, 8, 2, 256),
            VisionSpec(64, 2, 4, 128),
            seed=26,
            variant="onevision_video",
        ),
        ModelSpec(
            "qwen2-vl-guide",
            "qwen_vl",
            "guide",
            TextSpec(64, 2, 2, 1, 128),
            VisionSpec(32, 2, 2, 64),
            seed=31,
            variant="qwen2_vl",
        ),
        ModelSpec(
            "qwen2-vl-large",
            "qwen_vl",
            "large",
            TextSpec(128, 4, 4, 2, 256),
            VisionSpec(64, 3, 4, 128),
            seed=32,
            variant="qwen2_vl",
        ),
        ModelSpec(
            "qwen2.5-vl-guide",
            "qwen_vl",
            "guide",
            TextSpec(64, 2, 2, 1, 128),
            VisionSpec(32, 2, 2, 64),
            seed=33,
            variant="qwen2_5_vl",
        ),
        ModelSpec(
            "qwen2.5-vl-large",
            "qwen_vl",
            "large",
            TextSpec(128, 4, 4, 2, 256),
            VisionSpec(64, 3, 4, 128),
            seed=34,
            variant="qwen2_5_vl",
        ),
        ModelSpec(
            "qwen3-vl-guide",
            "qwen_vl",
            "guide",
            TextSpec(64, 2, 2, 1, 128),
            VisionSpec(32, 2, 2, 64),
            seed=35,
            variant="qwen3_vl",
        ),
        ModelSpec(
            "qwen3-vl-large",
            "qwen_vl",
            "large",
            TextSpec(128, 4, 4, 2, 256),
            VisionSpec(64, 3, 4, 128),
            seed=36,
            variant="qwen3_vl",
        ),
    )
}
