"""LLaVA (transformers-native ``llava``, ``llava_next`` and ``llava_onevision`` checkpoints).

Visual tokens: every ``<image>`` position (for NeXT/OneVision this includes the image-newline
tokens the processor expands). Guide and large see the same layout unless the guide of an
any-resolution checkpoint gets ``guide_max_crops`` (only the checkpoint's grid pinpoints of at most
that many crops); its importance is then mapped by the boxes of :meth:`LlavaFamily.image_boxes`.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from PIL import Image

from lmms_sgl.baselines.visionzip import ImageLayout, VisionZipParts
from lmms_sgl.families.base import HFVisionLanguageFamily, LoadedVLM
from lmms_sgl.families.video import Video
from lmms_sgl.method.cost import TransformerShape, mlp_chain_flops, vit_flops
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes, even_edges
from lmms_sgl.method.units import UnitsUnavailable, VisualUnits

ANY_RESOLUTION = ("llava_next", "llava_onevision")


def _size(value) -> dict:
    """A processor size (dict or ``SizeDict``) as a plain dict of its set keys."""
    if value is None:
        return {}
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {key: item for key, item in items if item is not None}


def _shape_only(height: int, width: int) -> np.ndarray:
    """A zero-memory ``(height, width, 1)`` array: transformers' size helpers read only its shape."""
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), (height, width, 1))


def _feature_layer(index: int, layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[index]`` (entry 0 is the embeddings)."""
    return (index % (layers + 1)) - 1


def _pinpoint_crops(pinpoint, crop: int) -> int:
    return (pinpoint[0] // crop) * (pinpoint[1] // crop)


def config_crop_flops(config) -> int:
    """Vision tower + projector FLOPs of one crop (or the base image), from the model config alone,
    so the run-time records and ``lmms-sgl-cost`` (which reads only ``config.json``) share one formula."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    has_class_token = vision.model_type == "clip_vision_model"
    tower = vit_flops(
        TransformerShape.from_vision_config(vision),
        patches + int(has_class_token),
        vision.patch_size,
        patches,
    )
    if getattr(vision, "vision_use_head", False):  # SigLIP's pooling head runs, though LLaVA discards it
        d = vision.hidden_size  # one probe query over every patch, then an MLP on that one row
        tower += 2 * d * d * (2 * patches + 2) + 4 * patches * d
        tower += mlp_chain_flops(1, [d, vision.intermediate_size, d])
    layers = config.vision_feature_layer
    width = vision.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    projected = patches + int(has_class_token and config.vision_feature_select_strategy == "full")
    projector = mlp_chain_flops(
        projected, [width, config.text_config.hidden_size, config.text_config.hidden_size]
    )
    return tower + projector


class LlavaFamily(HFVisionLanguageFamily):
    name = "llava"
    model_types = ("llava", "llava_next", "llava_onevision")
    supported = "LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision '-hf' checkpoints (0.5B to 72B)"

    def __init__(self, max_tiles: int | None = None, max_crops: int | None = None):
        super().__init__(max_tiles)
        self.max_crops = max_crops

    def for_guide(self, guide_max_crops: int | None = None, **layout) -> LlavaFamily:
        """A separate instance whose any-resolution grid keeps only the checkpoint's pinpoints of at
        most ``guide_max_crops`` crops (the guide sees its images in fewer crops)."""
        super().for_guide(**layout)  # any other layout argument is not LLaVA's
        return self if guide_max_crops is None else LlavaFamily(self.max_tiles, guide_max_crops)

    def check_checkpoint(self, path: str, argument: str) -> int:
        layers = super().check_checkpoint(path, argument)
        if self.max_crops is not None:
            from transformers import AutoConfig

            self.grid_within(AutoConfig.from_pretrained(path), argument, path)
        return layers

    def grid_within(self, config, argument: str, path: str) -> list:
        """The checkpoint's ``image_grid_pinpoints`` of at most ``max_crops`` crops (checked)."""
        if config.model_type not in ANY_RESOLUTION:
            raise ValueError(
                f"guide_max_crops={self.max_crops}: {argument}={path!r} is a {config.model_type!r} "
                f"checkpoint with a single grid; only any-resolution checkpoints {ANY_RESOLUTION} have crops"
            )
        crop = config.vision_config.image_size
        kept = [p for p in config.image_grid_pinpoints if _pinpoint_crops(p, crop) <= self.max_crops]
        if not kept:
            fewest = min(_pinpoint_crops(p, crop) for p in config.image_grid_pinpoints)
            raise ValueError(
                f"guide_max_crops={self.max_crops}: {argument}={path!r} has no grid pinpoint of so few "
                f"{crop} px crops (its smallest has {fewest}); allowed: guide_max_crops >= {fewest}"
            )
        return kept

    def load(self, path: str, **kwargs) -> LoadedVLM:
        """With ``max_crops``, the processor and the model share the reduced pinpoint list (the
        model unpacks crops by its config's grid, the processor counts tokens by its own)."""
        loaded = super().load(path, **kwargs)
        if self.max_crops is not None:
            kept = self.grid_within(loaded.model.config, kwargs.get("argument", "pretrained"), path)
            loaded.model.config.image_grid_pinpoints = kept
            loaded.model.model.config.image_grid_pinpoints = kept
            loaded.processor.image_processor.image_grid_pinpoints = kept
        return loaded

    def check_visionzip(self, path: str, argument: str) -> None:
        """VisionZip where the official code defines it: CLIP towers with [CLS] whose LM sequence
        drops it (strategy ``default``), LLaVA-1.5 (one grid) and LLaVA-NeXT (base image and crops,
        each selected on its own; the official ``llava_arch.py``). OneVision's SigLIP has no
        [CLS], for which the official code has no rule."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        implemented = (
            "VisionZip is implemented for LLaVA-1.5 ('llava') and LLaVA-NeXT ('llava_next') checkpoints "
            "with a CLIP tower and vision_feature_select_strategy 'default', and for InternVL"
        )
        clip = getattr(config, "vision_config", None) is not None and (
            config.vision_config.model_type == "clip_vision_model"
        )
        if config.model_type not in ("llava", "llava_next") or not clip:
            raise ValueError(
                f"method='visionzip': {argument}={path!r} is a {config.model_type!r} checkpoint; "
                f"{implemented}"
            )
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"method='visionzip': {argument}={path!r} has vision_feature_select_strategy="
                f"{config.vision_feature_select_strategy!r}; {implemented}"
            )
        if isinstance(config.vision_feature_layer, (list, tuple)):
            raise ValueError(f"method='visionzip': {argument}={path!r} reads several vision layers")

    def visionzip_parts(self, loaded: LoadedVLM) -> VisionZipParts:
        """CLIP: [CLS] at 0, LM token t of a crop is patch t + 1 of the layer the projector reads;
        NeXT: the layout of each image's base and crops through unpadding and newlines
        (:meth:`visionzip_layouts`)."""
        model = loaded.model.model
        config = loaded.model.config
        layers = model.vision_tower.encoder.layers
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        layouts = None
        if config.model_type == "llava_next":

            def layouts(inputs: dict) -> list[ImageLayout]:
                return self.visionzip_layouts(loaded, inputs)

        return VisionZipParts(
            attention=layers[_feature_layer(config.vision_feature_layer, len(layers))].self_attn,
            projector=model.multi_modal_projector,
            token_patches=torch.arange(1, patches + 1)[:, None],
            cls_index=0,
            image_layouts=layouts,
        )

    def visionzip_layouts(self, loaded: LoadedVLM, inputs: dict) -> list[ImageLayout]:
        """Per image of the batch, which crop (row of the tower's input) and patch each LM token
        comes from, found by the model's own ``pack_image_features`` on features that carry their
        crop and patch numbers (unpadding drops cells, newline tokens carry none)."""
        side = loaded.model.config.vision_config.image_size // loaded.model.config.vision_config.patch_size
        out = []
        for index in range(len(inputs.get("image_sizes", ()))):  # none for a batch without images
            crops = self._crops(loaded, inputs, index)
            crop = torch.arange(1, crops + 1, dtype=torch.float64)[:, None].expand(crops, side * side)
            patch = torch.arange(1, side * side + 1, dtype=torch.float64)[None].expand(crops, -1)
            packed = self._pack(loaded, inputs, index, torch.stack([crop, patch], -1), torch.zeros(2))
            source = packed.round().long() - 1  # newline tokens: (-1, -1)
            out.append(ImageLayout(crops, source))
        return out

    def _pack(
        self, loaded: LoadedVLM, inputs: dict, index: int, features: torch.Tensor, newline
    ) -> torch.Tensor:
        """The model's own ``pack_image_features`` on per-crop ``features`` ``[crops, patches, D]``
        of image ``index`` (float64, so identities survive), with ``newline`` as the image-newline."""
        config = loaded.model.config
        pack = loaded.model.model.pack_image_features
        options = {"image_newline": newline.to(torch.float64)}
        if "vision_feature_select_strategy" in inspect.signature(pack).parameters:
            options["vision_feature_select_strategy"] = config.vision_feature_select_strategy
        if "vision_aspect_ratio" in inspect.signature(pack).parameters:
            options["vision_aspect_ratio"] = getattr(config, "vision_aspect_ratio", "anyres_max_9")
        packed, _ = pack([features.clone()], inputs["image_sizes"][index : index + 1], **options)
        return packed[0]

    # -- video: LLaVA-OneVision's native input (frames through the tower, 2 x 2 pooled, one newline) --
    def check_video(self, loaded: LoadedVLM) -> None:
        """Videos need a OneVision checkpoint whose tokenizer has the video token and whose
        processor has a video processor (the released ``llava-onevision-*-hf`` ones do)."""
        config = loaded.model.config
        video_token = getattr(config, "video_token_id", None)
        if config.model_type != "llava_onevision":
            raise ValueError(
                f"{loaded.path!r} is a {config.model_type!r} checkpoint; sgl_llava takes videos with "
                "LLaVA-OneVision ('llava_onevision') checkpoints only"
            )
        tokenizer = loaded.tokenizer
        has_token = video_token is not None and video_token < len(tokenizer)
        named = getattr(loaded.processor, "video_token", None)
        if not has_token or named is None or tokenizer.convert_tokens_to_ids(named) != video_token:
            raise ValueError(
                f"{loaded.path!r} cannot take videos: its tokenizer has no video token matching "
                f"video_token_id={video_token} of its config"
            )
        if getattr(loaded.processor, "video_processor", None) is None:
            raise ValueError(f"{loaded.path!r} has no video processor, so it cannot take videos")

    def video_frames(self, video: Video) -> int:
        """lmms-eval's ``llava_hf`` rule: exactly ``num_frames`` indices spread evenly over the
        file (``np.linspace(0, total - 1, num_frames, dtype=int)``), repeating frames of a
        shorter video; so every clip of a batch has the same frame count."""
        return self.num_frames

    def video_inputs(self, loaded: LoadedVLM, videos: list[Video]) -> dict:
        """Frames decoded with decord at lmms-eval's ``llava_hf`` indices, as ``[T, H, W, 3]`` arrays
        (the processor resizes them to the tower's size)."""
        import decord

        clips = []
        for video in videos:
            reader = decord.VideoReader(video.path, ctx=decord.cpu(0))
            indices = np.linspace(0, video.total_frames - 1, self.video_frames(video), dtype=int)
            clips.append(reader.get_batch(indices.tolist()).asnumpy())
        return {"videos": clips}

    def video_flops(self, loaded: LoadedVLM, inputs: dict, videos_per_sample: list[int]) -> list[int]:
        """Each frame is one pass of the tower and projector (the 2 x 2 pooling is interpolation)."""
        pixels = inputs.get("pixel_values_videos")
        frames = [] if pixels is None else [pixels.shape[1]] * pixels.shape[0]
        per_video = iter(frames)
        per_frame = self.crop_flops(loaded)
        return [per_frame * sum(next(per_video) for _ in range(count)) for count in videos_per_sample]

    def video_units(self, loaded: LoadedVLM, video: Video, inputs: dict, index: int) -> VisualUnits:
        """Each frame is one unit (one row of the tower's input): the tower, projector and the
        2 x 2 bilinear pooling run frame by frame, so a frame's tokens read that frame alone. The
        video's closing image-newline token is a learned parameter and reads none (its owner is
        the last frame)."""
        frames = int(inputs["pixel_values_videos"].shape[1])
        vision = loaded.model.config.vision_config
        pooled = math.ceil(vision.image_size // vision.patch_size / 2) ** 2
        owner = torch.arange(frames).repeat_interleave(pooled)
        reads = torch.nn.functional.one_hot(owner, frames).bool()
        owner = torch.cat([owner, torch.tensor([frames - 1])])
        reads = torch.cat([reads, torch.zeros(1, frames, dtype=torch.bool)])
        flops = self.crop_flops(loaded)
        return VisualUnits(
            owner,
            reads,
            torch.zeros(frames, dtype=torch.bool),
            (1,) * frames,
            (flops,) * frames,
            (0,) * frames,
        )

    def crop_flops(self, loaded: LoadedVLM) -> int:
        return config_crop_flops(loaded.model.config)

    def crops_per_image(self, loaded: LoadedVLM, inputs: dict) -> list[int]:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        if pixel_values.dim() == 4 and "image_sizes" not in inputs:  # LLaVA-1.5: one crop per image
            return [1] * pixel_values.shape[0]
        return [self._crops(loaded, inputs, index) for index in range(len(inputs["image_sizes"]))]

    def vision_flops(
        self, loaded: LoadedVLM, inputs: dict, images_per_sample: list[int], n_visual: list[int]
    ):
        per_crop = self.crop_flops(loaded)
        crops = iter(self.crops_per_image(loaded, inputs))
        return [per_crop * sum(next(crops) for _ in range(count)) for count in images_per_sample]

    # -- geometry --------------------------------------------------------------------------
    def image_boxes(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> TokenBoxes:
        config = loaded.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        if config.model_type in ANY_RESOLUTION:
            return self._any_resolution_boxes(loaded, image, self._patched(inputs, index), side)
        return self._single_grid_boxes(loaded, image, side)

    def _single_grid_boxes(self, loaded: LoadedVLM, image: Image.Image, side: int) -> TokenBoxes:
        """LLaVA-1.5: one ``side x side`` grid over what the processor keeps (shortest-edge resize
        and centre crop: the middle of a non-square image; a fixed-size resize: all of it)."""
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension

        processor = loaded.processor.image_processor
        width, height = image.size
        size, crop = _size(processor.size), _size(getattr(processor, "crop_size", None))
        if "height" in size and "width" in size and not getattr(processor, "do_center_crop", False):
            x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
        elif "shortest_edge" in size and getattr(processor, "do_center_crop", False) and crop:
            new_h, new_w = get_resize_output_image_size(
                _shape_only(height, width),
                size["shortest_edge"],
                default_to_square=False,
                input_data_format=ChannelDimension.LAST,
            )
            if crop["height"] > new_h or crop["width"] > new_w:
                raise BoxesUnavailable(f"centre crop {crop} larger than the resized image {(new_h, new_w)}")
            top, left = int((new_h - crop["height"]) / 2.0), int((new_w - crop["width"]) / 2.0)
            x0, x1 = left * width / new_w, (left + crop["width"]) * width / new_w
            y0, y1 = top * height / new_h, (top + crop["height"]) * height / new_h
        else:
            raise BoxesUnavailable(f"{type(processor).__name__} with size={size}, crop_size={crop}")
        grid = TokenBoxes.grid(even_edges(x0, x1, side), even_edges(y0, y1, side), 0, 0)
        layout = f"1 crop {side}x{side} ({len(grid)})"
        extra = loaded.processor.num_additional_image_tokens
        if loaded.processor.vision_feature_select_strategy == "full" and extra:  # the class token(s)
            whole = torch.tensor([[x0, y0, x1, y1]] * extra, dtype=torch.float64)
            grid = TokenBoxes.cat([TokenBoxes.of(whole, 0, 1), grid])
        return TokenBoxes(grid.boxes, grid.image, grid.view, grid.newline, (layout,))

    @staticmethod
    def _patched(inputs: dict, index: int) -> bool:
        """Whether the processor cut image ``index`` into crops: OneVision does not for images of a
        multi-image group (``batch_num_images``, as its image processor decides)."""
        groups = inputs.get("batch_num_images")
        if groups is None:
            return True
        flags = [int(n) == 1 for n in groups.tolist() for _ in range(int(n))]
        if index >= len(flags):
            raise BoxesUnavailable(f"image {index} is not in batch_num_images={groups.tolist()}")
        return flags[index]

    def _any_resolution_boxes(
        self, loaded: LoadedVLM, image: Image.Image, patched: bool, side: int
    ) -> TokenBoxes:
        """LLaVA-NeXT / OneVision: the base image (view 0), then the crop grid (view 1) the
        processor's ``select_best_resolution`` picks, unpadded by the model's own ``unpad_image``,
        each row closed by an image-newline token. OneVision prompts with several images give each
        image its base view only (padded to a square), plus one newline."""
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
        from transformers.image_utils import ChannelDimension

        config = loaded.model.config
        width, height = image.size
        onevision = config.model_type == "llava_onevision"
        if config.vision_feature_select_strategy == "full" and not onevision:
            raise BoxesUnavailable("llava_next with vision_feature_select_strategy='full'")
        if onevision and not patched:  # pad_to_square, then one resize: the base view only
            square = max(width, height)
            left, top = (square - width) // 2, (square - height) // 2
            edges_x = even_edges(0.0, float(square), side) - left
            edges_y = even_edges(0.0, float(square), side) - top
            base = TokenBoxes.grid(edges_x.clamp(0, width), edges_y.clamp(0, height), 0, 0)
            line = TokenBoxes.of(torch.tensor([[0.0, 0.0, width, height]]), 0, 0, newline=True)
            return self._named(
                TokenBoxes.cat([base, line]), f"base only, padded to a square ({side * side + 1})"
            )
        base = TokenBoxes.grid(
            even_edges(0.0, float(width), side), even_edges(0.0, float(height), side), 0, 0
        )
        pinpoints = config.image_grid_pinpoints
        best_h, best_w = select_best_resolution((height, width), pinpoints)
        crop = config.vision_config.image_size
        rows, columns = best_h // crop, best_w // crop
        if rows * columns == 0:
            raise BoxesUnavailable(f"grid pinpoint {(best_h, best_w)} is smaller than one {crop} px crop")
        new_h, new_w = get_patch_output_size(
            _shape_only(height, width), (best_h, best_w), ChannelDimension.LAST
        )
        paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        # the full feature grid on the padded canvas, mapped back to original pixels
        x_edges = ((even_edges(0.0, float(best_w), columns * side) - paste_x) * width / new_w).clamp(0, width)
        y_edges = ((even_edges(0.0, float(best_h), rows * side) - paste_y) * height / new_h).clamp(0, height)
        kept = self._unpadded_cells(loaded, rows * side, columns * side, (height, width))
        keep_rows = kept.any(1).nonzero().flatten()
        keep_cols = kept.any(0).nonzero().flatten()
        x_edges = x_edges[keep_cols[0] : keep_cols[-1] + 2]
        y_edges = y_edges[keep_rows[0] : keep_rows[-1] + 2]
        grid_h, grid_w = len(y_edges) - 1, len(x_edges) - 1
        aspect = getattr(config, "vision_aspect_ratio", "anyres_max_9") if onevision else None
        if aspect is not None:  # OneVision's anyres_max_N: bilinear shrink of the unpadded grid
            most = int(aspect.removeprefix("anyres_max_"))
            ratio = math.sqrt(grid_h * grid_w / (most * side**2))
            if ratio > 1.1:
                grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
                x_edges = even_edges(float(x_edges[0]), float(x_edges[-1]), grid_w)
                y_edges = even_edges(float(y_edges[0]), float(y_edges[-1]), grid_h)
        cells = TokenBoxes.grid(x_edges, y_edges, 0, 1)
        rows_out = []
        for row in range(grid_h):
            rows_out.append(
                TokenBoxes(
                    *(
                        t[row * grid_w : (row + 1) * grid_w]
                        for t in (cells.boxes, cells.image, cells.view, cells.newline)
                    )
                )
            )
            band = torch.tensor(
                [[float(x_edges[0]), float(y_edges[row]), float(x_edges[-1]), float(y_edges[row + 1])]]
            )
            rows_out.append(TokenBoxes.of(band, 0, 1, newline=True))
        boxes = TokenBoxes.cat([base, *rows_out])
        return self._named(
            boxes,
            f"base {side}x{side} + {columns}x{rows} crops unpadded to {grid_w}x{grid_h} "
            f"+ {grid_h} newlines ({len(boxes)})",
        )

    @staticmethod
    def _named(boxes: TokenBoxes, layout: str) -> TokenBoxes:
        return TokenBoxes(boxes.boxes, boxes.image, boxes.view, boxes.newline, (layout,))

    @staticmethod
    def _unpadded_cells(
        loaded: LoadedVLM, grid_h: int, grid_w: int, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """``[grid_h, grid_w]`` bool: the feature cells the model's own ``unpad_image`` keeps."""
        import importlib

        module = importlib.import_module(type(loaded.model).__module__)
        index = torch.arange(grid_h * grid_w, dtype=torch.float64).reshape(1, grid_h, grid_w)
        survivors = module.unpad_image(index, torch.tensor(image_size)).flatten().long()
        kept = torch.zeros(grid_h * grid_w, dtype=torch.bool)
        kept[survivors] = True
        kept = kept.reshape(grid_h, grid_w)
        rows, cols = kept.any(1), kept.any(0)
        if not torch.equal(kept, rows[:, None] & cols[None, :]):
            raise BoxesUnavailable("unpad_image kept a non-rectangular set of cells")
        return kept

    # -- vision units ----------------------------------------------------------------------
    def check_unit_selection(self, path: str) -> None:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type not in ANY_RESOLUTION:
            raise ValueError(
                f"keep_units: pretrained={path!r} is a {model_type!r} (LLaVA-1.5) checkpoint, which "
                "encodes each image as one unit, so there is nothing to choose; "
                f"allowed with {ANY_RESOLUTION} checkpoints"
            )

    def image_units(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> VisualUnits:
        """LLaVA-1.5: the image is one unit. NeXT / OneVision: the base image (the global view)
        and each crop, one row of the tower's input each; which units each token reads is found
        by the model's own ``pack_image_features`` on one-hot features (unpadding, OneVision's
        bilinear shrink across crop borders and the image-newline parameter, which reads none)."""
        config = loaded.model.config
        flops = self.crop_flops(loaded)
        if config.model_type not in ANY_RESOLUTION:
            count = (inputs["input_ids"] == loaded.image_token_id).sum() // inputs["pixel_values"].shape[0]
            return VisualUnits.blocks([int(count)], [False], [1], [flops], 0)
        crops = self._crops(loaded, inputs, index)
        side = config.vision_config.image_size // config.vision_config.patch_size
        one_hot = torch.eye(crops, dtype=torch.float64)[:, None, :].expand(crops, side * side, crops)
        weights = self._pack(loaded, inputs, index, one_hot, torch.zeros(crops))
        reads = weights != 0
        owner = weights.argmax(1)
        for token in range(1, len(owner)):  # a newline token belongs to the token it closes
            if not reads[token].any():
                owner[token] = owner[token - 1]
        if not reads[0].any():
            raise UnitsUnavailable("the first visual token of an image reads no unit")
        global_view = [crops > 1] + [False] * (crops - 1)
        return VisualUnits(
            owner, reads, torch.tensor(global_view), (1,) * crops, (flops,) * crops, (0,) * crops
        )

    def _crops(self, loaded: LoadedVLM, inputs: dict, index: int) -> int:
        """Rows of the tower's input of image ``index``: base + crops, or 1 for a OneVision image of
        a multi-image prompt (as the model's ``get_image_features`` decides)."""
        if not self._patched(inputs, index):
            return 1
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = loaded.model.config
        return image_size_to_num_patches(
            image_size=tuple(inputs["image_sizes"][index].tolist()),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=config.vision_config.image_size,
        )
