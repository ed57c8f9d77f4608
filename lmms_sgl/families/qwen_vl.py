"""Qwen-VL: transformers-native ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``
and ``Qwen3VLForConditionalGeneration`` checkpoints.

Visual tokens: one ``<|image_pad|>`` per 2 x 2 merged patches at dynamic resolution (patch 14, 16
for Qwen3-VL), so each image's token count follows its size within ``[min_pixels, max_pixels]``.
Guide and large model must see the same tokens, so both processors get the same ``min_pixels`` /
``max_pixels`` (model args; by default each checkpoint's own processor setting).

The text model uses multimodal RoPE: each token has a (temporal, height, width) position computed
on the unpruned prompt, and generated tokens continue after ``rope_deltas``. Pruning needs nothing
family-specific for that: the pruner gathers cos/sin and position ids along their token dimension
(``lmms_sgl.method.pruning``), and Qwen3-VL's deepstack features follow the kept tokens.

Prompts are those of lmms-eval's ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: a system turn "You are a
helpful assistant.", then the images and the task text in one user turn.
"""

from __future__ import annotations

from dataclasses import replace

from lmms_sgl.families.base import HFVisionLanguageFamily, LoadedVLM, Prompt
from lmms_sgl.method.cost import TransformerShape, layer_flops, mlp_chain_flops

SYSTEM_PROMPT = "You are a helpful assistant."


def window_sizes(vision, frames: int, height: int, width: int) -> list[int]:
    """Patch count of each attention window of Qwen2.5-VL (``window_size`` px squares of merged
    units, cut at the image's edges), frame by frame."""
    merge = vision.spatial_merge_size
    side = vision.window_size // merge // vision.patch_size
    rows, cols = height // merge, width // merge
    sizes = [
        min(side, rows - r) * min(side, cols - c) * merge * merge
        for r in range(0, rows, side)
        for c in range(0, cols, side)
    ]
    return sizes * frames


def config_image_flops(config, grid: tuple[int, int, int]) -> int:
    """Vision tower + merger(s) FLOPs of one image of patch grid ``(frames, height, width)``, from the
    model config alone, so the run-time records and ``lmms-sgl-cost`` share one formula."""
    vision, model_type = config.vision_config, config.model_type
    frames, height, width = grid
    patches = frames * height * width
    if model_type == "qwen2_vl":
        width_v, heads = vision.embed_dim, vision.num_heads
        shape = TransformerShape(
            vision.depth, width_v, heads, heads, width_v // heads, int(width_v * vision.mlp_ratio), False
        )
    else:
        width_v, heads = vision.hidden_size, vision.num_heads
        gated = model_type == "qwen2_5_vl"
        shape = TransformerShape(
            vision.depth, width_v, heads, heads, width_v // heads, vision.intermediate_size, gated
        )
    channels = vision.in_channels * vision.temporal_patch_size
    embedding = 2 * patches * channels * vision.patch_size**2 * width_v
    full = [height * width] * frames
    windowed = window_sizes(vision, frames, height, width) if model_type == "qwen2_5_vl" else full
    full_layers = set(getattr(vision, "fullatt_block_indexes", range(vision.depth)))
    one_layer = replace(shape, num_layers=1)  # the per-layer formula, per chunk
    blocks = sum(
        sum(layer_flops(one_layer, n, n) for n in (full if index in full_layers else windowed))
        for index in range(vision.depth)
    )
    merge = vision.spatial_merge_size**2
    out = vision.out_hidden_size if model_type != "qwen2_vl" else vision.hidden_size
    merger = mlp_chain_flops(patches // merge, [width_v * merge, width_v * merge, out])
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or [])
    return embedding + blocks + mergers * merger


class QwenVLFamily(HFVisionLanguageFamily):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    supported = (
        "Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense) checkpoints "
        "(Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
        "Qwen3VLForConditionalGeneration), 2B to 72B"
    )

    def __init__(
        self, max_tiles: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None
    ):
        if max_tiles is not None:
            raise ValueError(
                f"max_tiles={max_tiles}: the {self.name} family has no tiles; "
                "its resolution is set by min_pixels / max_pixels"
            )
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} must be <= max_pixels={max_pixels}")
        super().__init__(None)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    # -- checks ----------------------------------------------------------------------------
    def check_checkpoint(self, path: str, argument: str) -> int:
        """The base checks, then the pixel bounds against this checkpoint's merged patch (from its
        config, before any weights load)."""
        from transformers import AutoConfig

        layers = super().check_checkpoint(path, argument)
        vision = AutoConfig.from_pretrained(path).vision_config
        self.check_pixel_bounds(vision.patch_size, vision.spatial_merge_size, f"{argument}={path!r}")
        return layers

    def check_pixel_bounds(self, patch: int, merge: int, checkpoint: str) -> None:
        """``min_pixels`` / ``max_pixels`` must not be below one merged patch, (patch x merge)^2
        pixels: the processor never makes an image smaller, so a lower ``max_pixels`` silently turns
        every image into a single visual token and a lower ``min_pixels`` means nothing."""
        side = patch * merge
        minimum = side * side
        effects = {
            "min_pixels": "every image is at least that large anyway",
            "max_pixels": "every image would become a single visual token",
        }
        for name, effect in effects.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(
                    f"{name}={value} is below one merged patch of {checkpoint}: {side} x {side} = {minimum} "
                    f"pixels (patch {patch} x merge {merge}), so {effect}; allowed: {name} >= {minimum}"
                )

    # -- loading and prompting -------------------------------------------------------------
    def load_processor(self, folder: str):
        """The checkpoint's processor with the area bounds ``min_pixels`` / ``max_pixels`` set on its
        image processor's ``size`` (the effect of lmms-eval's ``from_pretrained(min_pixels=...)``,
        without the per-call kwargs transformers deprecates)."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(folder)
        image_processor = processor.image_processor
        # the processor's own patch and merge sizes are what it resizes with
        self.check_pixel_bounds(image_processor.patch_size, image_processor.merge_size, repr(folder))
        size = image_processor.size
        image_processor.size = replace(
            size,
            shortest_edge=size.shortest_edge if self.min_pixels is None else self.min_pixels,
            longest_edge=size.longest_edge if self.max_pixels is None else self.max_pixels,
        )
        return processor

    def messages(self, prompt: Prompt) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, *super().messages(prompt)]

    def pixel_bounds(self, loaded: LoadedVLM) -> tuple[int, int]:
        """The ``(min_pixels, max_pixels)`` the processor resizes with."""
        size = loaded.processor.image_processor.size
        return int(size.shortest_edge), int(size.longest_edge)

    # -- cost ------------------------------------------------------------------------------
    def vision_flops(
        self, loaded: LoadedVLM, inputs: dict, images_per_sample: list[int], n_visual: list[int]
    ) -> list[int]:
        """Vision tower + merger(s) per sample, from each image's patch grid ``image_grid_thw``.

        Attention runs per frame (full layers) or per window (Qwen2.5-VL's other layers), so its
        cost is the sum over those chunks; everything else is linear in the patch count.
        """
        grids = inputs.get("image_grid_thw")
        per_image = [] if grids is None else [self.image_flops(loaded, tuple(g)) for g in grids.tolist()]
        images = iter(per_image)
        return [sum(next(images) for _ in range(count)) for count in images_per_sample]

    def image_flops(self, loaded: LoadedVLM, grid: tuple[int, int, int]) -> int:
        return config_image_flops(loaded.model.config, grid)

    @staticmethod
    def windows(vision, frames: int, height: int, width: int) -> list[int]:
        return window_sizes(vision, frames, height, width)
