"""What a model family must tell SGL: how to load, prompt and batch it, and what its vision costs.

A family knows processors, chat templates, where the text model and the image tokens are, and the
layout compatibility of two checkpoints. It knows nothing of lmms-eval. Families for
transformers-native checkpoints differ only in a few facts, kept as overrides of
:class:`HFVisionLanguageFamily`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from lmms_sgl.baselines.visionzip import VisionZipParts
from lmms_sgl.checkpoints.integrity import CheckpointError, check_finite, check_tokenizer_files, check_weights
from lmms_sgl.families.video import DEFAULT_NUM_FRAMES, Video, merge_encoded
from lmms_sgl.method.cost import TransformerShape
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes
from lmms_sgl.method.units import UnitSkipHooks, UnitsUnavailable, VisualUnits


@dataclass
class Prompt:
    """One request as the family sees it: the task's text, its images and its videos (each in
    order; a prompt lists its videos before its images).

    ``messages`` is set on the chat path: the task's own turns (``role`` and a ``content`` list of
    ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` / ``{"type": "video"}`` entries, images
    and videos in ``images``' and ``videos``' order), which the checkpoint's chat template renders as
    they are, the way lmms-eval's chat models do. Without it the family builds its one user turn from
    ``text`` (the simple path).
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    messages: list[dict] | None = None


@dataclass
class LoadedVLM:
    family: HFVisionLanguageFamily
    model: nn.Module
    processor: object
    path: str

    @property
    def text_model(self) -> nn.Module:
        return self.family.text_model(self.model)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def visual_token_ids(self) -> list[int]:
        """Token ids that hold visual features: the image token and, for checkpoints with native
        video input (Qwen-VL, LLaVA-OneVision), the video token."""
        video = getattr(self.model.config, "video_token_id", None)
        return [self.image_token_id] + ([video] if video is not None and video != self.image_token_id else [])

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` bool: the visual tokens (image and video) of a batch."""
        ids = torch.tensor(self.visual_token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def text_shape(self) -> TransformerShape:
        return TransformerShape.from_text_config(self.model.config.text_config)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            ids = [*ids, self.tokenizer.eos_token_id]
        return sorted({i for i in ids if i is not None})


class HFVisionLanguageFamily:
    """A transformers-native VLM family (``AutoModelForImageTextToText`` + ``AutoProcessor``)."""

    name = "base"
    model_types: tuple[str, ...] = ()
    supported = ""

    num_frames: int = DEFAULT_NUM_FRAMES  # frames sampled per video (set from the model args)

    has_tiles = False  # InternVL's dynamic tiling: the only family that takes ``max_tiles``

    def __init__(self, max_tiles: int | None = None):
        self.max_tiles = max_tiles

    # the large model's image-layout arguments (``max_tiles``, ``min_pixels`` / ``max_pixels``):
    # what :meth:`at_layout` may change for the FLOPs reference
    layout_arguments: tuple[str, ...] = ()

    def layout_key(self) -> tuple:
        """What decides the large model's layout of an image (two instances with equal keys build
        the same visual tokens for every request)."""
        return tuple(getattr(self, name) for name in self.layout_arguments)

    def at_layout(self, **layout) -> HFVisionLanguageFamily:
        """This family with the large model's layout arguments set to ``layout`` (a missing or
        ``None`` one: the family's default), everything else as here: the layout that
        ``flops_reference`` prices the large model alone at. Returns ``self`` when the layout is
        the same."""
        unknown = sorted(k for k, v in layout.items() if v is not None and k not in self.layout_arguments)
        if unknown:
            allowed = ", ".join(self.layout_arguments) or "none"
            raise ValueError(
                f"{', '.join(f'{k}={layout[k]!r}' for k in unknown)}: the {self.name} family's layout "
                f"arguments are: {allowed}"
            )
        family = self._at_layout({name: layout.get(name) for name in self.layout_arguments})
        return self if family.layout_key() == self.layout_key() else family

    def _at_layout(self, layout: dict) -> HFVisionLanguageFamily:
        return self

    def check_reference(self, path: str) -> None:
        """Refuse, before any weights load, a reference layout the checkpoint cannot take (its
        arguments are named ``reference_<argument>`` in messages)."""

    def view(self, loaded: LoadedVLM) -> LoadedVLM:
        """``loaded`` (its weights, config and tokenizer) seen through this family's layout, for
        pricing without a forward (a family whose layout lives in the processor gives its own)."""
        return LoadedVLM(self, loaded.model, loaded.processor, loaded.path)

    def for_guide(self, **layout) -> HFVisionLanguageFamily:
        """The family instance that serves the guide: this one, unless the guide gets its own
        image layout (``guide_max_tiles`` / ``guide_max_crops``, validated by the family)."""
        given = {name: value for name, value in layout.items() if value is not None}
        if given:
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: the {self.name} family has no "
                "separate guide layout"
            )
        return self

    # -- loading ---------------------------------------------------------------------------
    def check_checkpoint(self, path: str, argument: str) -> int:
        """Read only the config and the weight files' headers (cheap) and fail fast on a checkpoint
        we cannot serve or whose files are truncated. Returns the text model's layer count (what
        the prune layer K is a fraction of)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as error:
            if "trust_remote_code" in str(error) or "auto_map" in str(error):
                raise CheckpointError(self._remote_code_message(argument, path)) from error
            local = Path(path).exists()
            hint = "" if local else " (not a local folder; with HF_HUB_OFFLINE=1 it must be in the hub cache)"
            raise CheckpointError(
                f"{argument}={path!r} could not be read as a checkpoint{hint}: {error}"
            ) from error
        if getattr(config, "auto_map", None) and config.model_type not in self.model_types:
            raise CheckpointError(self._remote_code_message(argument, path))
        if config.model_type not in self.model_types:
            raise CheckpointError(
                f"{argument}={path!r} is a {config.model_type!r} checkpoint; the {self.name} family serves "
                f"model types {self.model_types} ({self.supported})"
            )
        check_weights(path, argument)
        check_tokenizer_files(path, argument)
        return config.text_config.num_hidden_layers

    def _remote_code_message(self, argument: str, path: str) -> str:
        return (
            f"{argument}={path!r} is a remote-code checkpoint (trust_remote_code), "
            "which lmms-sgl does not run; "
            f"the {self.name} family serves transformers-native checkpoints: {self.supported}"
        )

    def load(
        self,
        path: str,
        *,
        dtype: torch.dtype,
        device_map: str | dict | None,
        text_attention: str,
        max_memory: dict | None = None,
        argument: str = "pretrained",
        vision_attention: str = "sdpa",
    ) -> LoadedVLM:
        """Load a checkpoint (``argument`` names it in messages) with the text model's attention
        ``text_attention`` and the vision tower's ``vision_attention`` (VisionZip records it);
        ``path`` stays what the user gave (lmms-eval names outputs after it)."""
        from transformers import AutoModelForImageTextToText

        folder = self.resolve(path, argument)
        model = AutoModelForImageTextToText.from_pretrained(
            folder,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            attn_implementation={"text_config": text_attention, "vision_config": vision_attention},
        ).eval()
        check_finite(model, str(path), argument)
        processor = self.load_processor(folder)
        processor.tokenizer.padding_side = "left"  # the method's batching assumes left padding
        return LoadedVLM(self, model, processor, str(path))

    def resolve(self, path: str, argument: str) -> str:
        """The folder or hub id ``from_pretrained`` loads for ``path`` (families that convert
        checkpoints return the converted folder)."""
        return path

    def load_processor(self, folder: str):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder)

    # -- prompting -------------------------------------------------------------------------
    def text_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def messages(self, prompt: Prompt) -> list[dict]:
        """The user turn lmms-eval's chat models build: one entry per video and image, then the text."""
        content = [{"type": "video"} for _ in prompt.videos] + [{"type": "image"} for _ in prompt.images]
        content.append({"type": "text", "text": prompt.text})
        return [{"role": "user", "content": content}]

    def chat_messages(self, loaded: LoadedVLM, prompt: Prompt) -> list[dict]:
        """The task's own turns, as lmms-eval's chat model for this family passes them to the
        template (unchanged here; Qwen3-VL's model puts a system turn first)."""
        return prompt.messages

    def prompt_text(self, loaded: LoadedVLM, prompt: Prompt) -> str:
        messages = self.messages(prompt) if prompt.messages is None else self.chat_messages(loaded, prompt)
        return loaded.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def processor_kwargs(self) -> dict:
        return {}

    def processor_kwargs_for(self, loaded: LoadedVLM) -> dict:
        """The processor's extra arguments for images of ``loaded`` (a family whose choice depends
        on the checkpoint overrides this)."""
        return self.processor_kwargs()

    def check_video(self, loaded: LoadedVLM) -> None:
        """Refuse videos for a checkpoint that cannot take them (a clear per-sample error)."""
        raise ValueError(f"the {self.name} family does not take videos ({loaded.path!r})")

    def video_inputs(self, loaded: LoadedVLM, videos: list[Video]) -> dict:
        """The processor's video arguments for ``videos`` (frames decoded and sampled as this
        family's lmms-eval model does)."""
        raise ValueError(f"the {self.name} family does not take videos")

    def video_frames(self, video: Video) -> int:
        """Frames this family feeds of ``video``: ``num_frames`` sampled uniformly, or all of a
        shorter video."""
        return min(self.num_frames, video.total_frames)

    # processors that stack a batch's video frames into one tensor need equal frame counts
    stacks_video_frames = True

    def encode(
        self, loaded: LoadedVLM, texts: list[str], images: list[Image.Image], videos: list[Video] = ()
    ) -> dict:
        """Tokenize a batch (left padding) with its images and videos, moved to the model's device
        and dtype. An empty image is refused with its place in the batch (the processors divide by
        its size)."""
        for index, image in enumerate(images):
            if image.width == 0 or image.height == 0:
                raise ValueError(
                    f"image {index} of the batch is empty ({image.width} x {image.height} pixels): "
                    "nothing to encode; check the task's doc_to_visual for this sample"
                )
        if videos:
            self.check_video(loaded)
        inputs = loaded.processor(
            images=images or None,
            text=texts,
            return_tensors="pt",
            padding=True,
            **(self.processor_kwargs_for(loaded) if images else {}),
            **(self.video_inputs(loaded, list(videos)) if videos else {}),
        )
        return self.to_device(loaded, inputs)

    @staticmethod
    def to_device(loaded: LoadedVLM, inputs) -> dict:
        dtype = loaded.model.dtype
        return {
            key: value.to(loaded.device, dtype) if value.is_floating_point() else value.to(loaded.device)
            for key, value in inputs.items()
        }

    def build_batch(self, loaded: LoadedVLM, prompts: list[Prompt]) -> dict:
        texts = [self.prompt_text(loaded, p) for p in prompts]
        images = [image for p in prompts for image in p.images]
        videos = [video for p in prompts for video in p.videos]
        if self.stacks_video_frames and len(prompts) > 1 and len({self.video_frames(v) for v in videos}) > 1:
            # the processor cannot stack clips of different lengths: encode apart, pad alike
            parts = [
                self.encode(loaded, [t], p.images, p.videos) for t, p in zip(texts, prompts, strict=True)
            ]
            return merge_encoded(parts, loaded.tokenizer.pad_token_id)
        return self.encode(loaded, texts, images, videos)

    # -- methods that read the vision tower ------------------------------------------------
    def check_visionzip(self, path: str, argument: str) -> None:
        """Fail before loading when VisionZip is not defined for this checkpoint."""
        raise ValueError(
            f"method='visionzip' is not defined for the {self.name} family ({argument}={path!r}); "
            "allowed with sgl_llava (LLaVA-1.5 and LLaVA-NeXT checkpoints), sgl_internvl2 and "
            "sgl_qwen2_vl (Qwen2-VL, Qwen2.5-VL)"
        )

    def visionzip_parts(self, loaded: LoadedVLM) -> VisionZipParts:
        """The vision layer, projector and token-to-patch map VisionZip reads (see
        :class:`lmms_sgl.baselines.visionzip.VisionZipParts`)."""
        raise ValueError(f"method='visionzip' is not defined for the {self.name} family")

    # -- cost ------------------------------------------------------------------------------
    def vision_flops(self, loaded: LoadedVLM, inputs: dict, n_visual: list[int]) -> list[int]:
        """Vision tower + projector FLOPs per sample of a batch."""
        raise NotImplementedError

    def video_flops(self, loaded: LoadedVLM, inputs: dict, videos_per_sample: list[int]) -> list[int]:
        """Vision FLOPs of each sample's videos (zero where the family counts frames as images)."""
        return [0] * len(videos_per_sample)

    # -- geometry --------------------------------------------------------------------------
    def image_boxes(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> TokenBoxes:
        """The original-image box of each visual token of one image (``index``: its place among the
        batch's images), as the processor tiled it for ``inputs``."""
        raise BoxesUnavailable(f"the {self.name} family does not derive token boxes")

    def visual_boxes(
        self, loaded: LoadedVLM, inputs: dict, prompts: list[Prompt]
    ) -> list[TokenBoxes | BoxesUnavailable]:
        """Per sample, the boxes of its visual tokens (images in order), or why they cannot be
        derived; checked against the visual-token count the processor produced."""
        counts = loaded.visual_mask(inputs["input_ids"]).sum(1).tolist()
        out: list[TokenBoxes | BoxesUnavailable] = []
        first = 0
        for prompt, count in zip(prompts, counts, strict=True):
            first += len(prompt.images)
            if prompt.videos:
                out.append(BoxesUnavailable("token boxes of video frames are not derived"))
                continue
            try:
                parts = [
                    self.image_boxes(loaded, image, inputs, first - len(prompt.images) + index).shifted(index)
                    for index, image in enumerate(prompt.images)
                ]
                boxes = TokenBoxes.cat(parts)
                if len(boxes) != count:
                    layout = "; ".join(boxes.layout)
                    raise BoxesUnavailable(
                        f"derived {len(boxes)} token boxes ({layout}) for {count} visual tokens"
                    )
                out.append(boxes)
            except BoxesUnavailable as error:
                out.append(error)
            except (AttributeError, KeyError, TypeError, ValueError) as error:  # a processor we do not know
                out.append(BoxesUnavailable(f"{type(error).__name__}: {error}"))
        return out

    # -- vision units ----------------------------------------------------------------------
    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The module that encodes the units (its input rows are the units' rows, batch order)."""
        return model.model.vision_tower

    def vision_modules(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Where unit skipping selects rows (the tower's input) and scatters them back (the
        projector's output, so the projector too runs on encoded units only)."""
        return self.vision_tower(model), model.model.multi_modal_projector

    def check_unit_selection(self, path: str) -> None:
        """Refuse ``keep_units`` for a checkpoint whose requests never have more than one unit
        (called before weights load); families with tiles, crops or several images accept it."""

    def unit_skip_hooks(self, sizes: list[int], keep: list[bool]) -> UnitSkipHooks:
        return UnitSkipHooks(sizes, keep)

    def image_units(self, loaded: LoadedVLM, image: Image.Image, inputs: dict, index: int) -> VisualUnits:
        """The vision units of one image (``index``: its place among the batch's images)."""
        raise UnitsUnavailable(f"the {self.name} family does not derive vision units")

    def visual_units(
        self, loaded: LoadedVLM, inputs: dict, prompts: list[Prompt]
    ) -> list[VisualUnits | UnitsUnavailable]:
        """Per sample, the vision units of its videos and images (in order), or why they cannot be derived;
        checked against the visual-token count the processor produced."""
        counts = loaded.visual_mask(inputs["input_ids"]).sum(1).tolist()
        if inputs.get("pixel_values") is not None and inputs.get("pixel_values_videos") is not None:
            # the tower runs once for the images, once for the videos: one row layout cannot cover both
            reason = "a batch with both images and native videos (the vision tower runs once per kind)"
            return [UnitsUnavailable(reason) for _ in prompts]
        out: list[VisualUnits | UnitsUnavailable] = []
        first = first_video = 0
        for prompt, count in zip(prompts, counts, strict=True):
            try:
                parts = [
                    self.video_units(loaded, video, inputs, first_video + v)
                    for v, video in enumerate(prompt.videos)
                ]
                parts += [
                    self.image_units(loaded, image, inputs, first + i)
                    for i, image in enumerate(prompt.images)
                ]
                units = VisualUnits.cat([replace(u, image=(i,) * u.count) for i, u in enumerate(parts)])
                if len(units) != count:
                    raise UnitsUnavailable(f"derived units for {len(units)} tokens, the prompt has {count}")
                out.append(units)
            except UnitsUnavailable as error:
                out.append(error)
            except (BoxesUnavailable, AttributeError, KeyError, TypeError, ValueError) as error:
                out.append(UnitsUnavailable(f"{type(error).__name__}: {error}"))
            first += len(prompt.images)
            first_video += len(prompt.videos)
        return out

    def video_units(self, loaded: LoadedVLM, video: Video, inputs: dict, index: int) -> VisualUnits:
        """The vision units of one video (``index``: its place among the batch's videos)."""
        raise UnitsUnavailable(f"the {self.name} family does not derive the vision units of videos")
