"""LLaVA (transformers-native ``llava``, ``llava_next`` and ``llava_onevision`` checkpoints).

Visual tokens: every ``<image>`` position (for NeXT/OneVision this includes the image-newline
tokens the processor expands). Guide and large must use the same vision resolution, patch size
and any-resolution grid so that they see the same number of visual tokens.
"""

from __future__ import annotations

from lmms_sgl.families.base import HFVisionLanguageFamily, LoadedVLM
from lmms_sgl.method.cost import TransformerShape, mlp_chain_flops, vit_flops


class LlavaFamily(HFVisionLanguageFamily):
    name = "llava"
    model_types = ("llava", "llava_next", "llava_onevision")
    supported = "LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision '-hf' checkpoints (0.5B to 72B)"

    def crop_flops(self, loaded: LoadedVLM) -> int:
        config = loaded.model.config
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        has_class_token = vision.model_type == "clip_vision_model"
        tower = vit_flops(
            TransformerShape.from_vision_config(vision),
            patches + int(has_class_token),
            vision.patch_size,
            patches,
        )
        layers = config.vision_feature_layer
        width = vision.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
        projected = patches + int(has_class_token and config.vision_feature_select_strategy == "full")
        projector = mlp_chain_flops(
            projected, [width, config.text_config.hidden_size, config.text_config.hidden_size]
        )
        return tower + projector

    def crops_per_image(self, loaded: LoadedVLM, inputs: dict) -> list[int]:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        if pixel_values.dim() == 4:  # LLaVA-1.5: one crop per image
            return [1] * pixel_values.shape[0]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = loaded.model.config
        return [
            image_size_to_num_patches(
                image_size=tuple(size.tolist()),
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for size in inputs["image_sizes"]
        ]

    def vision_flops(
        self, loaded: LoadedVLM, inputs: dict, images_per_sample: list[int], n_visual: list[int]
    ):
        per_crop = self.crop_flops(loaded)
        crops = iter(self.crops_per_image(loaded, inputs))
        return [per_crop * sum(next(crops) for _ in range(count)) for count in images_per_sample]
