"""An image as the large (or guide) model sees it: its units, their visual tokens and vision FLOPs.

A unit is what a vision tower encodes independently: an InternVL tile or its thumbnail, a LLaVA
any-resolution crop or its base image. Qwen-VL encodes one image as one attention group, and LLaVA-1.5
has a single crop, so their images are one unit that cannot be skipped. Per-unit FLOPs come from the
functions the families use at run time (``config_tile_flops`` / ``config_crop_flops`` /
``config_image_flops``); token counts follow the processors' own rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmms_sgl.families.internvl import config_tile_flops
from lmms_sgl.families.llava import ANY_RESOLUTION, config_crop_flops
from lmms_sgl.families.qwen_vl import config_image_flops


class LayoutError(ValueError):
    """A layout argument the checkpoint cannot take; the message names the argument."""


@dataclass(frozen=True)
class Unit:
    name: str
    tokens: int
    flops: int
    is_global: bool = False  # the thumbnail / base image


@dataclass(frozen=True)
class ImageLayout:
    units: tuple[Unit, ...]
    description: str
    skippable: bool  # whether units are encoded independently (exact skipping possible)

    @property
    def visual_tokens(self) -> int:
        return sum(u.tokens for u in self.units)

    @property
    def vision_flops(self) -> int:
        return sum(u.flops for u in self.units)

    @property
    def local_units(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if not u.is_global)

    @property
    def global_units(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.is_global)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def internvl_layout(config, tiles: int) -> ImageLayout:
    """``tiles`` tiles plus a thumbnail when there is more than one (InternVL's dynamic tiling)."""
    per_tile, tokens = config_tile_flops(config), int(config.image_seq_length)
    units = [Unit(f"tile {i + 1}", tokens, per_tile) for i in range(tiles)]
    if tiles > 1:
        units.append(Unit("thumbnail", tokens, per_tile, is_global=True))
    text = f"{tiles} tile{'s' if tiles > 1 else ''}" + (" + thumbnail" if tiles > 1 else "")
    return ImageLayout(tuple(units), f"{text}, {tokens * len(units)} visual tokens", skippable=True)


def grid_crops(config) -> list[tuple[int, int]]:
    """The ``(columns, rows)`` crop grids of an any-resolution checkpoint's ``image_grid_pinpoints``."""
    crop = config.vision_config.image_size
    return sorted({(w // crop, h // crop) for h, w in config.image_grid_pinpoints})


def anyres_grid_tokens(config, columns: int, rows: int) -> int:
    """Crop-grid tokens (with one image-newline per row) of an image whose aspect matches the grid
    (nothing unpadded), after OneVision's ``anyres_max_N`` shrink, as the processor counts them."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    height, width = rows * side, columns * side
    aspect = getattr(config, "vision_aspect_ratio", None)
    if config.model_type == "llava_onevision" and aspect:
        ratio = math.sqrt(height * width / (int(aspect.removeprefix("anyres_max_")) * side**2))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
    return height * width + height


def llava_layout(config, crops: tuple[int, int] | None, argument: str = "--crops") -> ImageLayout:
    """LLaVA-1.5: one crop. NeXT / OneVision: the base image plus a ``columns x rows`` crop grid (one
    of the checkpoint's pinpoints), the grid's tokens shared evenly between its crops."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    per_crop = config_crop_flops(config)
    if config.model_type not in ANY_RESOLUTION:
        if crops is not None:
            raise LayoutError(
                f"{argument}={crops[0]}x{crops[1]}: a {config.model_type!r} checkpoint has a single crop; "
                f"only any-resolution checkpoints {ANY_RESOLUTION} take crops"
            )
        cls = int(
            vision.model_type == "clip_vision_model" and config.vision_feature_select_strategy == "full"
        )
        unit = Unit("image", side * side + cls, per_crop, is_global=True)
        return ImageLayout((unit,), f"1 crop, {unit.tokens} visual tokens", skippable=False)
    if crops is None:
        raise LayoutError(f"{argument} is required for a {config.model_type!r} checkpoint (e.g. 3x3)")
    allowed = grid_crops(config)
    if crops not in allowed:
        raise LayoutError(
            f"{argument}={crops[0]}x{crops[1]} is not a grid of the checkpoint's image_grid_pinpoints; "
            f"allowed (columns x rows): {', '.join(f'{c}x{r}' for c, r in allowed)}"
        )
    columns, rows = crops
    count, grid = columns * rows, anyres_grid_tokens(config, columns, rows)
    units = [Unit("base image", side * side, per_crop, is_global=True)]
    units += [Unit(f"crop {i + 1}", grid // count + (i < grid % count), per_crop) for i in range(count)]
    total = sum(u.tokens for u in units)
    return ImageLayout(tuple(units), f"base + {columns}x{rows} crops, {total} visual tokens", skippable=True)


def base_image_layout(config) -> ImageLayout:
    """A LLaVA-NeXT / OneVision image as its base image alone (no crops: one unit, as a single-image
    LLaVA-1.5 request); any other LLaVA checkpoint at its single crop."""
    if config.model_type not in ANY_RESOLUTION:
        return llava_layout(config, None)
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    unit = Unit("base image", side * side, config_crop_flops(config), is_global=True)
    return ImageLayout((unit,), f"base image only, {unit.tokens} visual tokens", skippable=False)


def qwen_grid(config, width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """The ``(frames, height, width)`` patch grid the Qwen-VL image processor gives an image."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return 1, new_h // vision.patch_size, new_w // vision.patch_size


def qwen_layout(config, size: tuple[int, int], min_pixels: int, max_pixels: int) -> ImageLayout:
    """One image at its dynamic resolution: one attention group, so one unit that cannot be skipped."""
    grid = qwen_grid(config, size[0], size[1], min_pixels, max_pixels)
    merge = config.vision_config.spatial_merge_size
    tokens = grid[0] * grid[1] * grid[2] // merge**2
    patch = config.vision_config.patch_size
    unit = Unit("image", tokens, config_image_flops(config, grid), is_global=True)
    text = f"{size[0]}x{size[1]} px -> {grid[2] * patch}x{grid[1] * patch}, {tokens} visual tokens"
    return ImageLayout((unit,), text, skippable=False)
