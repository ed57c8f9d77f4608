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
helpful assistant.", then the images and the task text in one user turn (simple path); the task's own
turns as they are (chat path), with that system turn put first for Qwen3-VL as lmms-eval's ``qwen3_vl``
does (Qwen2-VL / Qwen2.5-VL templates add it themselves when the task has none).

Pixels: with ``preprocessing="lmms_eval"`` (default) images reach the processor as they reach it in
lmms-eval's model for the large checkpoint's architecture (:mod:`lmms_sgl.families.qwen_pixels`); the
guide gets the same, so both see the same pixels. ``"processor"`` leaves resizing to the processor.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from loguru import logger
from PIL import Image
from torch import nn

from lmms_sgl.baselines.visionzip import VisionZipParts
from lmms_sgl.families import qwen_pixels
from lmms_sgl.families.base import HFVisionLanguageFamily, LoadedVLM, Prompt
from lmms_sgl.families.video import Video
from lmms_sgl.method.cost import TransformerShape, layer_flops, mlp_chain_flops
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes, even_edges
from lmms_sgl.method.units import UnitSkipHooks, VisualUnits

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


def window_orders(vision, grid_thw) -> list[torch.Tensor]:
    """Per image, the LM index of each merged token in the order Qwen2.5-VL's tower holds them
    (grouped into attention windows: transformers' own ``get_vision_window_index``)."""
    from transformers.vision_utils import get_vision_window_index

    merge = vision.spatial_merge_size
    index, _ = get_vision_window_index(grid_thw, merge, vision.window_size, vision.patch_size)
    counts = [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    return [part - offset for part, offset in zip(torch.split(index, counts), offsets, strict=True)]


class QwenVLFamily(HFVisionLanguageFamily):
    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    supported = (
        "Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense) checkpoints "
        "(Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "
        "Qwen3VLForConditionalGeneration), 2B to 72B"
    )

    def __init__(
        self,
        max_tiles: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        preprocessing: str = "lmms_eval",
    ):
        if preprocessing not in qwen_pixels.MODES:
            raise ValueError(f"preprocessing={preprocessing!r}; allowed: {qwen_pixels.MODES}")
        if max_tiles is not None:
            raise ValueError(
                f"max_tiles={max_tiles}: the {self.name} family has no tiles; "
                "its resolution is set by min_pixels / max_pixels"
            )
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels={min_pixels} must be <= max_pixels={max_pixels}")
        super().__init__(None)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.preprocessing = preprocessing
        self.large_architecture: str | None = None  # set by check_checkpoint("pretrained")

    layout_arguments = ("min_pixels", "max_pixels")

    def _at_layout(self, layout: dict) -> QwenVLFamily:
        family = QwenVLFamily(None, layout["min_pixels"], layout["max_pixels"], self.preprocessing)
        family.large_architecture, family.num_frames = self.large_architecture, self.num_frames
        return family

    def view(self, loaded: LoadedVLM) -> LoadedVLM:
        """The bounds live in the processor: a processor of the same checkpoint with this
        instance's bounds (the weights are shared)."""
        processor = self.load_processor(self.resolve(loaded.path, "pretrained"))
        processor.tokenizer.padding_side = "left"
        return LoadedVLM(self, loaded.model, processor, loaded.path)

    # -- checks ----------------------------------------------------------------------------
    def check_reference(self, path: str) -> None:
        """The reference layout's pixel bounds against the checkpoint (before any weights load)."""
        from transformers import AutoConfig

        vision = AutoConfig.from_pretrained(path).vision_config
        self.check_pixel_bounds(
            vision.patch_size, vision.spatial_merge_size, f"pretrained={path!r}", "reference_"
        )

    def check_checkpoint(self, path: str, argument: str) -> int:
        """The base checks, then the pixel bounds against this checkpoint's merged patch (from its
        config, before any weights load)."""
        from transformers import AutoConfig

        layers = super().check_checkpoint(path, argument)
        config = AutoConfig.from_pretrained(path)
        vision = config.vision_config
        self.check_pixel_bounds(vision.patch_size, vision.spatial_merge_size, f"{argument}={path!r}")
        if argument == "pretrained":  # whose lmms-eval preprocessing guide and large model get
            self.large_architecture = config.model_type
            bounds = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
            given = {k: v for k, v in bounds.items() if v is not None}
            if given and self.preprocessing == "lmms_eval" and self.large_architecture == "qwen3_vl":
                logger.warning(
                    f"{given}: with preprocessing='lmms_eval' Qwen3-VL images are sized by qwen_vl_utils' "
                    "defaults and not resized again, as in lmms-eval's qwen3_vl, so these bounds do not "
                    "reach images; use preprocessing=processor to bound them"
                )
        return layers

    def check_pixel_bounds(self, patch: int, merge: int, checkpoint: str, prefix: str = "") -> None:
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
                    f"{prefix}{name}={value} is below one merged patch of {checkpoint}: {side} x {side} = "
                    f"{minimum} pixels (patch {patch} x merge {merge}), so {effect}; "
                    f"allowed: {prefix}{name} >= {minimum}"
                )

    # -- loading and prompting -------------------------------------------------------------
    def architecture(self, loaded_type: str) -> str:
        """Whose preprocessing both models get: the large checkpoint's architecture when known."""
        return self.large_architecture or loaded_type

    def load_processor(self, folder: str):
        """The checkpoint's processor with the area bounds ``min_pixels`` / ``max_pixels`` set on its
        image processor's ``size`` (the effect of lmms-eval's ``from_pretrained(min_pixels=...)``,
        without the per-call kwargs transformers deprecates). Unset bounds are lmms-eval's model
        defaults with ``preprocessing="lmms_eval"``, the checkpoint's own otherwise."""
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(folder)
        image_processor = processor.image_processor
        # the processor's own patch and merge sizes are what it resizes with
        self.check_pixel_bounds(image_processor.patch_size, image_processor.merge_size, repr(folder))
        size = image_processor.size
        lower, upper = size.shortest_edge, size.longest_edge
        if self.preprocessing == "lmms_eval":
            lower, upper = qwen_pixels.DEFAULT_BOUNDS[
                self.architecture(AutoConfig.from_pretrained(folder).model_type)
            ]
        image_processor.size = replace(
            size,
            shortest_edge=lower if self.min_pixels is None else self.min_pixels,
            longest_edge=upper if self.max_pixels is None else self.max_pixels,
        )
        # lmms-eval's from_pretrained(min_pixels=..., max_pixels=...) sets the video processor's too
        video_processor = getattr(processor, "video_processor", None)
        if video_processor is not None:
            size = video_processor.size
            video_processor.size = replace(
                size,
                shortest_edge=size.shortest_edge if self.min_pixels is None else self.min_pixels,
                longest_edge=size.longest_edge if self.max_pixels is None else self.max_pixels,
            )
        return processor

    def messages(self, prompt: Prompt) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, *super().messages(prompt)]

    def chat_messages(self, loaded: LoadedVLM, prompt: Prompt) -> list[dict]:
        if loaded.model.config.model_type == "qwen3_vl":  # lmms-eval's qwen3_vl always inserts it
            system = {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
            return [system, *prompt.messages]
        return prompt.messages

    def encode(
        self, loaded: LoadedVLM, texts: list[str], images: list[Image.Image], videos: list[Video] = ()
    ) -> dict:
        """Images resized (and for Qwen2-VL re-encoded) as lmms-eval's model for the large
        checkpoint's architecture does before its processor, then the processor (videos: read by
        ``qwen_vl_utils`` in :meth:`video_inputs`)."""
        if self.preprocessing == "processor" or not images:
            return super().encode(loaded, texts, images, videos)
        arch = self.architecture(loaded.model.config.model_type)
        bounds = (self.min_pixels, self.max_pixels)
        ready = [qwen_pixels.prepare(image, arch, *bounds) for image in images]
        return super().encode(loaded, texts, ready, videos)

    def processor_kwargs_for(self, loaded: LoadedVLM) -> dict:
        arch = self.architecture(loaded.model.config.model_type)
        if self.preprocessing == "lmms_eval" and arch == "qwen3_vl":
            return {"do_resize": False}  # lmms-eval's qwen3_vl: qwen_vl_utils already sized the image
        return {}

    def pixel_bounds(self, loaded: LoadedVLM) -> tuple[int, int]:
        """The ``(min_pixels, max_pixels)`` the processor resizes with."""
        size = loaded.processor.image_processor.size
        return int(size.shortest_edge), int(size.longest_edge)

    # -- video: native input (temporal patches of 2 frames, 3-D RoPE with temporal positions) --------
    stacks_video_frames = False  # patches are flattened: clips of any length share a batch

    def check_video(self, loaded: LoadedVLM) -> None:
        if getattr(loaded.processor, "video_processor", None) is None:
            raise ValueError(f"{loaded.path!r} has no video processor, so it cannot take videos")

    def video_frames(self, video: Video) -> int:
        """lmms-eval's ``qwen2_5_vl`` rule: ``min(num_frames, total)`` floored to an even count (the
        temporal patch is 2 frames), at least 2."""
        return max(2, min(self.num_frames, video.total_frames) // 2 * 2)

    def video_inputs(self, loaded: LoadedVLM, videos: list[Video]) -> dict:
        """Frames read by ``qwen_vl_utils`` (as lmms-eval's ``qwen2_5_vl`` / ``qwen3_vl`` read them:
        ``nframes`` of :meth:`video_frames`, resized within the pixel bounds), with their metadata."""
        from qwen_vl_utils import process_vision_info

        low, high = self.pixel_bounds(loaded)
        content = [
            {
                "type": "video",
                "video": v.path,
                "min_pixels": low,
                "max_pixels": high,
                "nframes": self.video_frames(v),
            }
            for v in videos
        ]
        _, clips, _ = process_vision_info(
            [[{"role": "user", "content": content}]], return_video_kwargs=True, return_video_metadata=True
        )
        frames, metadata = zip(*clips, strict=True)
        return {"videos": list(frames), "video_metadata": list(metadata)}

    def video_flops(self, loaded: LoadedVLM, inputs: dict, videos_per_sample: list[int]) -> list[int]:
        """Per sample, its videos' tower + merger FLOPs from ``video_grid_thw`` (attention runs per
        temporal patch, as for an image's frame)."""
        grids = inputs.get("video_grid_thw")
        per_video = [] if grids is None else [self.image_flops(loaded, tuple(g)) for g in grids.tolist()]
        videos = iter(per_video)
        return [sum(next(videos) for _ in range(count)) for count in videos_per_sample]

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

    # -- VisionZip -------------------------------------------------------------------------
    def check_visionzip(self, path: str, argument: str) -> None:
        """Qwen2-VL and Qwen2.5-VL: the tower has no [CLS], so dominant tokens are the ones the last
        block's queries attend to most (the paper's rule for such towers); each LM token is the
        merger's 2 x 2 group of consecutive patches. Qwen2.5-VL's last block must attend over whole
        images (it does in the released checkpoints). Qwen3-VL feeds intermediate (deepstack)
        features to the LM, which the merge would have to follow: not implemented."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        implemented = "VisionZip is implemented for Qwen2-VL, Qwen2.5-VL, LLaVA-1.5 and InternVL"
        if config.model_type == "qwen3_vl":
            raise ValueError(
                f"method='visionzip': {argument}={path!r} is a 'qwen3_vl' checkpoint, whose deepstack "
                f"features reach the LM from intermediate vision layers; {implemented}"
            )
        vision = config.vision_config
        full = getattr(vision, "fullatt_block_indexes", None)
        if full is not None and vision.depth - 1 not in full:
            raise ValueError(
                f"method='visionzip': {argument}={path!r} has windowed attention in its last vision block "
                f"(fullatt_block_indexes={full}, depth={vision.depth}); VisionZip reads whole-image "
                "attention there"
            )

    def visionzip_parts(self, loaded: LoadedVLM) -> VisionZipParts:
        """The last vision block (whose output the merger reads), the merger as projector, LM tokens
        of ``spatial_merge_size ** 2`` consecutive patches (images differ in size) and, for
        Qwen2.5-VL, the window order the tower holds them in."""
        tower = self.vision_tower(loaded.model)
        vision = loaded.model.config.vision_config
        merge = vision.spatial_merge_size
        windowed = getattr(vision, "fullatt_block_indexes", None) is not None
        return VisionZipParts(
            attention=tower.blocks[-1].attn,
            projector=tower.merger,
            token_patches=None,
            cls_index=None,
            group=merge * merge,
            flat_features=True,
            token_order=(lambda inputs: window_orders(vision, inputs["image_grid_thw"]))
            if windowed
            else None,
        )

    # -- vision units ----------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        return model.model.visual

    def vision_modules(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The merger (projector) runs inside the tower."""
        return self.vision_tower(model), self.vision_tower(model)

    def unit_skip_hooks(self, sizes: list[int], keep: list[bool]) -> UnitSkipHooks:
        """The tower's input is the patches (``hidden_states``); ``grid_thw`` has one row per image
        or video, split into one row per temporal patch (an image has one), the units."""
        return UnitSkipHooks(
            sizes, keep, input_name="hidden_states", per_unit=("grid_thw",), per_temporal_patch=True
        )

    def image_boxes(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> TokenBoxes:
        """Dynamic resolution resizes the whole image (no crop, no padding) to the patch grid
        ``image_grid_thw``; each LM token is a merged ``spatial_merge_size`` square of patches,
        row-major: a grid of ``h / m`` rows and ``w / m`` columns over the original image."""
        frames, height, width = inputs["image_grid_thw"][index].tolist()
        merge = loaded.model.config.vision_config.spatial_merge_size
        if frames != 1 or height % merge or width % merge:
            raise BoxesUnavailable(f"image grid {(frames, height, width)} is not one frame of whole merges")
        rows, columns = height // merge, width // merge
        x_edges = even_edges(0.0, float(image.size[0]), columns)
        y_edges = even_edges(0.0, float(image.size[1]), rows)
        return TokenBoxes.grid(x_edges, y_edges, 0, 0, layout=f"{columns}x{rows} merged patches")

    def image_units(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> VisualUnits:
        """One image is one unit: its patches attend to each other (one attention group), so only
        whole images can be skipped. Rows: its patches; tokens: one per merged 2 x 2 patches."""
        grid = tuple(inputs["image_grid_thw"][index].tolist())
        patches = grid[0] * grid[1] * grid[2]
        merge = loaded.model.config.vision_config.spatial_merge_size**2
        return VisualUnits.blocks([patches // merge], [False], [patches], [self.image_flops(loaded, grid)], 0)

    def video_units(self, loaded: LoadedVLM, video: Video, inputs: dict, index: int) -> VisualUnits:
        """Each temporal patch (2 frames) is one unit. The tower's attention segments
        (``cu_seqlens``, and Qwen2.5-VL's windows) are cut per temporal patch, its rotary positions
        are (h, w) only and the merger works on 2 x 2 patches of one temporal patch, so a video
        encoded as ``t`` grids ``(1, h, w)`` gives the same features as one grid ``(t, h, w)``.
        Rows: a temporal patch's ``h * w`` patches; tokens: one per merged 2 x 2 patches."""
        frames, height, width = inputs["video_grid_thw"][index].tolist()
        merge = loaded.model.config.vision_config.spatial_merge_size**2
        patches = height * width
        flops = self.image_flops(loaded, (1, height, width))
        return VisualUnits.blocks(
            [patches // merge] * frames, [False] * frames, [patches] * frames, [flops] * frames, 0
        )
