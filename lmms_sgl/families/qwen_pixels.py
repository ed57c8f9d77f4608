"""The pixels lmms-eval's Qwen models hand their processor, per architecture of the large checkpoint.

lmms-eval does not leave Qwen images to the processor alone (lmms-eval 0.7.3):

* ``qwen2_vl`` (a simple model) re-encodes **every** image as JPEG at quality 85, then resizes it with
  ``qwen_vl_utils.fetch_image`` within its ``min_pixels`` / ``max_pixels`` (defaults 3136 / 602112),
  then its processor resizes with the same bounds;
* ``qwen2_5_vl`` (chat) resizes with ``fetch_image``'s own default bounds (4 to 16384 tokens of 28 px),
  then its processor with ``min_pixels`` / ``max_pixels`` (defaults 200704 / 1605632);
* ``qwen3_vl`` (chat) resizes with ``fetch_image`` at patch 16 (factor 32, default bounds) and calls
  the processor with ``do_resize=False``: its ``min_pixels`` / ``max_pixels`` do not reach images.

The model args ``min_pixels`` / ``max_pixels`` play the part of the lmms-eval model's arguments of
the same name, step by step as above (so with Qwen3-VL they do not reach images; the family warns).
We call the same ``qwen_vl_utils`` function lmms-eval calls, so the resampling is the same code.
"""

from __future__ import annotations

from io import BytesIO

from PIL import Image

MODES = ("lmms_eval", "processor")
# processor bounds (min_pixels, max_pixels) of lmms-eval's model for each architecture
DEFAULT_BOUNDS = {
    "qwen2_vl": (3136, 602112),
    "qwen2_5_vl": (256 * 28 * 28, 1605632),
    "qwen3_vl": (256 * 28 * 28, 1605632),
}
JPEG_QUALITY = 85


def jpeg_round_trip(image: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    """``image`` as it comes back from a JPEG file at ``quality`` (PIL's default subsampling)."""
    buffer = BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded.copy()


def prepare(
    image: Image.Image, architecture: str, min_pixels: int | None, max_pixels: int | None
) -> Image.Image:
    """The image lmms-eval's model for ``architecture`` passes to its processor."""
    from qwen_vl_utils import fetch_image

    if architecture not in DEFAULT_BOUNDS:
        raise ValueError(f"no lmms-eval preprocessing known for model type {architecture!r}")
    element: dict = {"image": image}
    if architecture == "qwen2_vl":
        lower, upper = DEFAULT_BOUNDS["qwen2_vl"]
        element = {
            "image": jpeg_round_trip(image),
            "min_pixels": lower if min_pixels is None else min_pixels,
            "max_pixels": upper if max_pixels is None else max_pixels,
        }
    patch = 16 if architecture == "qwen3_vl" else 14
    return fetch_image(element, image_patch_size=patch)
