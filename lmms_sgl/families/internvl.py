"""InternVL (transformers-native ``InternVLForConditionalGeneration``: InternVL2.5/3/3.5 ``-hf``).

Visual tokens: ``<IMG_CONTEXT>`` x 256 per 448 px tile (patch 14, pixel shuffle 0.5), dynamic tiling
into up to ``max_tiles`` tiles plus a thumbnail. Guide and large model must tile identically, so
both processors get the same ``max_patches``.
"""

from __future__ import annotations

from lmms_sgl.families.base import HFVisionLanguageFamily, LoadedVLM
from lmms_sgl.method.cost import TransformerShape, mlp_chain_flops, vit_flops


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


class InternVLFamily(HFVisionLanguageFamily):
    name = "internvl"
    model_types = ("internvl",)
    supported = (
        "InternVL2.5 / InternVL3 / InternVL3.5 '-hf' checkpoints "
        "(InternVLForConditionalGeneration), 1B to 78B"
    )

    def processor_kwargs(self) -> dict:
        return {} if self.max_tiles is None else {"max_patches": self.max_tiles}

    def tile_flops(self, loaded: LoadedVLM) -> int:
        config = loaded.model.config
        vision = config.vision_config
        patch, size = _first(vision.patch_size), _first(vision.image_size)
        patches = (size // patch) ** 2
        tower = vit_flops(TransformerShape.from_vision_config(vision), patches + 1, patch, patches)
        shuffle = int(1 / config.downsample_ratio) ** 2
        projector = mlp_chain_flops(
            patches // shuffle,
            [vision.hidden_size * shuffle, config.text_config.hidden_size, config.text_config.hidden_size],
        )
        return tower + projector

    def vision_flops(
        self, loaded: LoadedVLM, inputs: dict, images_per_sample: list[int], n_visual: list[int]
    ):
        per_tile = self.tile_flops(loaded)
        tokens_per_tile = loaded.model.config.image_seq_length
        return [per_tile * (n // tokens_per_tile) for n in n_visual]
