"""The processor of a converted original InternVL checkpoint: tokenizer, tiling, chat template.

``build_processor`` returns a plain transformers ``InternVLProcessor`` (saved with
``save_pretrained``; loads with ``AutoProcessor``, no remote code) whose prompts and pixels equal
what the original ``chat()`` feeds the model:

* tokenizer: :mod:`lmms_sgl.checkpoints.internvl_original.tokenizer` (original ids, stop token as EOS);
* chat template: the checkpoint's ``template`` (:mod:`lmms_sgl.checkpoints.internvl_original.templates`);
* images: transformers' ``GotOcr2ImageProcessor`` implements InternVL's dynamic tiling rule exactly
  (same candidate grids and order, aspect-ratio choice and tie rule, row-major tiles, thumbnail
  when more than one tile). Its PIL backend (``GotOcr2ImageProcessorPil``: PIL bicubic resize,
  /255, ImageNet mean/std) reproduces the original pixels bit for bit; the torchvision backend,
  which ``AutoProcessor`` picks by default when torchvision is installed, resizes with torch's
  bicubic: same tile grids, but pixels differ by up to 0.43 after normalisation (about 25 of 255
  grey levels; 0.19 on smooth images). Load with :func:`load_processor` (or
  ``AutoProcessor.from_pretrained(path, use_fast=False)``) to get the exact one.
"""

from __future__ import annotations

from pathlib import Path

from lmms_sgl.checkpoints.internvl_original.templates import chat_template, conversation_format
from lmms_sgl.checkpoints.internvl_original.tokenizer import (
    SentencePieceTokenizer,
    build_tokenizer,
    decodes_byte_fallback,
)

DEFAULT_MAX_TILES = 6  # the paper's and lmms-eval's internvl2 setting (configs say 12)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _field(config: dict, name: str, kind: type | tuple[type, ...]):
    value = config.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"config.json field {name!r} is {value!r}; expected {kind}")
    return value


def tile_size(original_config: dict) -> int:
    """The tile side in pixels: ``force_image_size`` (448), else the vision config's ``image_size``."""
    size = original_config.get("force_image_size") or (original_config.get("vision_config") or {}).get(
        "image_size"
    )
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"config.json field 'force_image_size' is {size!r}; expected a positive int (448)")
    return size


def image_seq_length(original_config: dict) -> int:
    """Visual tokens per tile: (tile / patch)^2 * downsample_ratio^2 (256 for 448 px, patch 14, 0.5)."""
    size = tile_size(original_config)
    patch = (original_config.get("vision_config") or {}).get("patch_size")
    if not isinstance(patch, int) or isinstance(patch, bool) or patch <= 0 or size % patch:
        raise ValueError(
            f"config.json field 'vision_config.patch_size' is {patch!r}; "
            f"expected a positive divisor of {size}"
        )
    ratio = _field(original_config, "downsample_ratio", (int, float))
    tokens = (size // patch) ** 2 * ratio**2
    if ratio <= 0 or tokens != int(tokens):
        raise ValueError(
            f"config.json field 'downsample_ratio' is {ratio!r}; (tile/patch)^2 * ratio^2 must be a whole "
            f"number of tokens (tile {size}, patch {patch})"
        )
    return int(tokens)


def image_processor(original_config: dict, max_tiles: int = DEFAULT_MAX_TILES):
    """InternVL's tiling as ``GotOcr2ImageProcessorPil`` (the backend that matches PIL exactly)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1:
        raise ValueError(f"max_tiles={max_tiles!r}; expected an int >= 1")
    dynamic = original_config.get("dynamic_image_size", True)
    if dynamic and original_config.get("use_thumbnail", True) is not True:
        raise ValueError(
            f"config.json field 'use_thumbnail' is {original_config.get('use_thumbnail')!r}; only true is "
            "supported with dynamic_image_size (transformers' tiling always adds the thumbnail)"
        )
    size = tile_size(original_config)
    return GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles if dynamic else 1,  # one tile: the whole image resized, as the original
        resample=3,  # PIL bicubic, the default of PIL's Image.resize used by the original
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def build_processor(src_dir: Path, original_config: dict, max_tiles: int = DEFAULT_MAX_TILES):
    """The ``InternVLProcessor`` for an original checkpoint folder and its parsed ``config.json``."""
    from transformers import InternVLProcessor, InternVLVideoProcessor

    template = conversation_format(original_config.get("template")).name
    tokenizer = build_tokenizer(Path(src_dir), original_config)
    return InternVLProcessor(
        image_processor=image_processor(original_config, max_tiles),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=image_seq_length(original_config),
        chat_template=chat_template(template),
    )


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """Ids generation stops at: the template separator, as the original ``chat()`` sets ``eos_token_id``."""
    stop = conversation_format(template).stop_token
    token_id = tokenizer.convert_tokens_to_ids(stop)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"template {template!r} stops at {stop!r}, which the tokenizer lacks as one token")
    return [token_id]


def load_processor(path: str | Path, **kwargs):
    """``AutoProcessor.from_pretrained`` with the PIL image backend (exact original pixels) and, for
    SentencePiece tokenizers, :class:`SentencePieceTokenizer` (the slow tokenizer's decoding).

    ``backend="pil"`` cannot be passed to ``AutoProcessor`` (the video processor has no PIL
    backend), so the image processor is reloaded from the same files with the PIL backend; the
    tokenizer is reloaded from its files as the subclass (the saved config names the base class).
    """
    from transformers import AutoImageProcessor, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, **kwargs)
    processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", **kwargs)
    if decodes_byte_fallback(processor.tokenizer.backend_tokenizer):
        tokenizer = SentencePieceTokenizer.from_pretrained(path, **kwargs)
        tokenizer.padding_side = processor.tokenizer.padding_side
        processor.tokenizer = tokenizer
    return processor
