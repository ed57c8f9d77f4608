"""InternVL: transformers-native ``InternVLForConditionalGeneration`` (InternVL2.5/3/3.5 ``-hf``)
and the original remote-code layout (InternVL2 1B-76B, InternVL2.5/3 ``InternVLChatModel``), which is
converted once into the native layout without running its code (``lmms_sgl.checkpoints.internvl_original``).

Visual tokens: ``<IMG_CONTEXT>`` x 256 per 448 px tile (patch 14, pixel shuffle 0.5), dynamic tiling
into up to ``max_tiles`` tiles plus a thumbnail. Both processors get the same ``max_patches``: by
default 12 for ``-hf`` checkpoints (as lmms-eval's ``internvl_hf``) and 6 when the large model is an
original checkpoint (the paper's and lmms-eval's ``internvl2`` setting), unless the guide gets its own
``guide_max_tiles`` (a cheaper guide; its importance is then mapped by the boxes of
:meth:`InternVLFamily.image_boxes`). Original checkpoints tile with the PIL image processor,
pixel-exact with the original preprocessing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from PIL import Image

from lmms_sgl.baselines.visionzip import VisionZipParts
from lmms_sgl.checkpoints.internvl_original.config import read_original_config
from lmms_sgl.checkpoints.internvl_original.convert import DEFAULT_MAX_TILES as ORIGINAL_MAX_TILES
from lmms_sgl.checkpoints.internvl_original.convert import MARKER, check_original, resolve_checkpoint
from lmms_sgl.checkpoints.internvl_original.processing import load_processor
from lmms_sgl.families.base import HFVisionLanguageFamily, LoadedVLM
from lmms_sgl.families.video import Video, decode_sampled
from lmms_sgl.method.cost import TransformerShape, mlp_chain_flops, vit_flops
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes, even_edges
from lmms_sgl.method.units import VisualUnits

NATIVE_MAX_TILES = 12


def converted_from_original(folder: str) -> bool:
    """A folder written by ``lmms-sgl-convert`` (or the conversion cache)."""
    return (Path(folder) / MARKER).is_file()


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def config_tile_flops(config) -> int:
    """Vision tower + projector FLOPs of one tile (or the thumbnail), from the ``InternVLConfig`` alone,
    so the run-time records and ``lmms-sgl-cost`` (which reads only ``config.json``) share one formula."""
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


class InternVLFamily(HFVisionLanguageFamily):
    name = "internvl"
    has_tiles = True
    model_types = ("internvl",)
    supported = (
        "InternVL2.5 / InternVL3 / InternVL3.5 '-hf' checkpoints "
        "(InternVLForConditionalGeneration), 1B to 78B, and original InternVL2 / 2.5 / 3 checkpoints "
        "(InternVLChatModel), converted on first use"
    )

    def __init__(self, max_tiles: int | None = None):
        super().__init__(max_tiles)
        self.large_is_original = False

    def for_guide(self, guide_max_tiles: int | None = None, **layout) -> InternVLFamily:
        """A separate instance tiling the guide's images into at most ``guide_max_tiles`` tiles."""
        super().for_guide(**layout)  # any other layout argument is not InternVL's
        if guide_max_tiles is None:
            return self
        family = InternVLFamily(max_tiles=guide_max_tiles)
        family.large_is_original = self.large_is_original
        return family

    layout_arguments = ("max_tiles",)

    def layout_key(self) -> tuple:
        return (self.tiles,)  # max_tiles=None and the default tile count are one layout

    def _at_layout(self, layout: dict) -> InternVLFamily:
        family = InternVLFamily(max_tiles=layout["max_tiles"])
        family.large_is_original, family.num_frames = self.large_is_original, self.num_frames
        return family

    def check_checkpoint(self, path: str, argument: str) -> int:
        original = read_original_config(path, argument)  # None: not the original layout
        if original is None:
            layers = super().check_checkpoint(path, argument)
        else:  # what its conversion would refuse, refused now: before either model loads
            check_original(path, original)
            layers = original.num_layers
        if argument == "pretrained":
            self.large_is_original = original is not None or converted_from_original(path)
        return layers

    def resolve(self, path: str, argument: str) -> str:
        return resolve_checkpoint(path, argument)

    def load_processor(self, folder: str):
        if converted_from_original(folder):  # the original preprocessing: PIL, pixel-exact
            return load_processor(folder)
        return super().load_processor(folder)

    @property
    def tiles(self) -> int:
        if self.max_tiles is not None:
            return self.max_tiles
        return ORIGINAL_MAX_TILES if self.large_is_original else NATIVE_MAX_TILES

    def processor_kwargs(self) -> dict:
        return {"max_patches": self.tiles}

    def check_visionzip(self, path: str, argument: str) -> None:
        """InternViT has a [CLS] token in every tile: VisionZip is defined (see :meth:`visionzip_parts`)."""

    def visionzip_parts(self, loaded: LoadedVLM) -> VisionZipParts:
        """InternViT: [CLS] at 0, dropped before the 2 x 2 pixel shuffle; LM token t of a tile gathers
        the four patches the model's own ``pixel_shuffle`` puts into it (found by shuffling indices)."""
        model = loaded.model.model
        config = loaded.model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError("method='visionzip' expects InternVL to drop [CLS] (strategy 'default')")
        layers = model.vision_tower.encoder.layer
        side = _first(config.vision_config.image_size) // _first(config.vision_config.patch_size)
        index = torch.arange(side * side, dtype=torch.float64).reshape(1, side, side, 1)
        shuffled = model.pixel_shuffle(index, scale_factor=config.downsample_ratio)
        groups = shuffled.reshape(-1, shuffled.shape[-1]).round().long() + 1  # + 1: after [CLS]
        feature = config.vision_feature_layer
        return VisionZipParts(
            attention=layers[(feature % (len(layers) + 1)) - 1].attention,
            projector=model.multi_modal_projector,
            token_patches=groups,
            cls_index=0,
        )

    # -- video: frames as 448 px single tiles, "Frame{i}: <img>...</img>" (transformers' processor) --
    def check_video(self, loaded: LoadedVLM) -> None:
        if getattr(loaded.processor, "video_processor", None) is None:
            raise ValueError(
                f"{loaded.path!r} has no video processor (an original InternVL checkpoint converted by "
                "lmms-sgl, whose PIL preprocessing reads images only); videos need an InternVL -hf checkpoint"
            )

    def video_inputs(self, loaded: LoadedVLM, videos: list[Video]) -> dict:
        """As lmms-eval's ``internvl_hf``: ``num_frames`` frames picked by the video processor's own
        ``sample_frames``, decoded with decord (see :mod:`lmms_sgl.families.video`)."""
        sampler = loaded.processor.video_processor.sample_frames
        frames = [decode_sampled(video, sampler, self.num_frames)[0] for video in videos]
        return {"videos": frames, "do_sample_frames": False}

    def video_units(self, loaded: LoadedVLM, video: Video, inputs: dict, index: int) -> VisualUnits:
        """Each frame is one unit: ``image_seq_length`` tokens, one row of ``pixel_values``."""
        per_tile, frames = loaded.model.config.image_seq_length, self.video_frames(video)
        flops = self.tile_flops(loaded)
        return VisualUnits.blocks([per_tile] * frames, [False] * frames, [1] * frames, [flops] * frames, 0)

    def tile_flops(self, loaded: LoadedVLM) -> int:
        return config_tile_flops(loaded.model.config)

    def vision_flops(
        self, loaded: LoadedVLM, inputs: dict, images_per_sample: list[int], n_visual: list[int]
    ):
        per_tile = self.tile_flops(loaded)
        tokens_per_tile = loaded.model.config.image_seq_length
        return [per_tile * (n // tokens_per_tile) for n in n_visual]

    def image_boxes(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> TokenBoxes:
        """Tiles row-major (the grid the image processor's own ``get_optimal_tiled_canvas`` picks),
        then the thumbnail when there is more than one tile; each tile's tokens row-major on a
        ``sqrt(image_seq_length)`` square grid (pixel shuffle keeps the patch order)."""
        processor = loaded.processor.image_processor
        side = math.isqrt(loaded.model.config.image_seq_length)
        if side * side != loaded.model.config.image_seq_length:
            raise BoxesUnavailable(f"image_seq_length={loaded.model.config.image_seq_length} is not a square")
        width, height = image.size
        columns = rows = 1
        if getattr(processor, "crop_to_patches", False) and self.tiles > 1:
            size = processor.size
            tile = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
            module = sys.modules[type(processor).__module__]
            canvas = getattr(module, "get_optimal_tiled_canvas", None)
            if canvas is None:
                raise BoxesUnavailable(f"{type(processor).__name__} has no get_optimal_tiled_canvas")
            columns, rows = canvas((height, width), tile, processor.min_patches, self.tiles)
        x_edges = even_edges(0.0, float(width), columns * side)
        y_edges = even_edges(0.0, float(height), rows * side)
        tiles = TokenBoxes.grid(x_edges, y_edges, 0, 0)
        # reorder the global grid into tile-major order: tile (row, column), then its tokens row-major
        order = torch.arange(rows * side * columns * side).reshape(rows, side, columns, side)
        tiles = TokenBoxes(
            tiles.boxes[order.permute(0, 2, 1, 3).flatten()], tiles.image, tiles.view, tiles.newline
        )
        layout = f"{columns}x{rows} tiles" + (" + thumbnail" if columns * rows > 1 else "")
        parts = [tiles]
        if columns * rows > 1:
            whole = TokenBoxes.grid(
                even_edges(0.0, float(width), side), even_edges(0.0, float(height), side), 0, 1
            )
            parts.append(whole)
        boxes = TokenBoxes.cat(parts)
        return TokenBoxes(boxes.boxes, boxes.image, boxes.view, boxes.newline, (f"{layout} ({len(boxes)})",))

    def image_units(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> VisualUnits:
        """One unit per tile and one for the thumbnail (the global view): ``image_seq_length``
        consecutive tokens each, one row of ``pixel_values`` each, in the same order."""
        per_tile = loaded.model.config.image_seq_length
        boxes = self.image_boxes(loaded, image, inputs, index)
        tiles = len(boxes) // per_tile
        thumbnail = (boxes.view.reshape(tiles, per_tile)[:, 0] == 1).tolist()
        flops = self.tile_flops(loaded)
        return VisualUnits.blocks([per_tile] * tiles, thumbnail, [1] * tiles, [flops] * tiles, 0)
