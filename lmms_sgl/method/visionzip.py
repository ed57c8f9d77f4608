"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant plus merged contextual tokens,
chosen by the *vision tower's* attention, before the language model (K = 0).

What the paper does (Sec. 3.2-3.3), per image (per crop / tile):

* **dominant tokens**: the ``K_d`` tokens with the highest attention received in the vision layer
  whose output the projector reads, i.e. the attention of the [CLS] token averaged over heads; for
  towers without [CLS] (SigLIP) the attention each token receives, averaged over all queries;
* **contextual tokens**: of the remaining tokens, ``K_c`` *targets* are sampled uniformly (every
  ``R // K_c``-th in order); every other remaining token joins the target whose key (same layer)
  is most similar, and each group is averaged in the vision-feature space and then projected;
  the paper's splits are 54 + 10 (64), 108 + 20 (128), 162 + 30 (192), so ``K_c = round(keep *
  10 / 64)`` here.

What this implementation decides where the paper or the families differ:

* the tokens are the language model's visual tokens; when one LM token gathers several patches
  (InternVL's 2 x 2 pixel shuffle, which happens after [CLS] is dropped), its attention score is
  the [CLS] attention summed over its patches, its key the mean of their keys, its feature the
  pixel-shuffled feature the projector receives (so merging still happens before the projector);
* key similarity is cosine similarity (the keys are normalised, heads concatenated);
* placement: the paper feeds the LLM the dominant tokens, then the contextual ones, as a shorter
  sequence. Here every kept token keeps its original RoPE position, as for every other method of
  the package: a dominant token its own, a contextual token the slot and position of its target
  (which the paper samples uniformly over the image, so contextual tokens stay spread over it).
  Renumbering would shift every later text position and all decoding positions.

Reading the tower's attention goes through transformers' ``AttentionInterface``: the vision tower
runs :data:`VISION_ATTENTION_NAME`, ordinary SDPA that, while a :class:`VisionZipRecorder` is
active, also computes the probabilities of the one recorded layer (the [CLS] row, or every row for
the mean received) and keeps that layer's keys.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lmms_sgl.method.selection import KeepPlan, keep_count, pack_positions

VISION_ATTENTION_NAME = "sgl_vision_record"
CONTEXTUAL_SHARE = 10 / 64  # the paper's 54 dominant + 10 contextual of 64

_ACTIVE: contextvars.ContextVar[VisionZipRecorder | None] = contextvars.ContextVar(
    "sgl_visionzip", default=None
)


@dataclass(frozen=True)
class VisionZipParts:
    """Where a family's VisionZip quantities live.

    Attributes:
        attention: the attention module of the vision layer the projector's features come from.
        projector: the module mapping per-token vision features to LM embeddings.
        token_patches: ``[T, G]`` key indices (in the recorded layer's sequence) of the patches
            each of an image's T language-model tokens gathers.
        cls_index: the [CLS] token's index in that sequence, ``None`` if the tower has none.
    """

    attention: nn.Module
    projector: nn.Module
    token_patches: torch.Tensor
    cls_index: int | None


def recording_vision_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """SDPA attention that also feeds the active :class:`VisionZipRecorder`, if any."""
    recorder = _ACTIVE.get()
    if recorder is not None and module is recorder.parts.attention:
        recorder.observe(query, key, attention_mask, module.scaling if scaling is None else scaling)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def register_vision_attention() -> str:
    AttentionInterface.register(VISION_ATTENTION_NAME, recording_vision_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VISION_ATTENTION_NAME, sdpa_mask)
    return VISION_ATTENTION_NAME


register_vision_attention()


class VisionZipRecorder:
    """One prefill's vision quantities, per image (tile) in the order the tower encoded them:
    attention received per LM token, keys per LM token, and the projector's input features."""

    def __init__(self, parts: VisionZipParts):
        self.parts = parts
        self.received: list[torch.Tensor] = []  # per batch of images: [n, T]
        self.keys: list[torch.Tensor] = []  # [n, T, H * hd]
        self.features: list[torch.Tensor] = []  # [n, T, C]

    @contextmanager
    def active(self) -> Iterator[VisionZipRecorder]:
        token = _ACTIVE.set(self)
        handle = self.parts.projector.register_forward_pre_hook(self._take_features)
        try:
            yield self
        finally:
            handle.remove()
            _ACTIVE.reset(token)

    def _take_features(self, module: nn.Module, args: tuple) -> None:
        self.features.append(args[0].detach())

    def observe(self, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> None:
        """``query``/``key`` ``[n, H, N, hd]``: scores per patch key, then gathered per LM token."""
        if attention_mask is not None:
            raise RuntimeError("VisionZip expects the vision tower's full (unmasked) attention")
        cls = self.parts.cls_index
        rows = query[:, :, cls : cls + 1] if cls is not None else query
        probs = torch.softmax((rows.float() @ key.float().transpose(-1, -2)) * scaling, dim=-1)
        per_patch = probs.mean(dim=(1, 2))  # heads (and, without [CLS], queries) averaged: [n, N]
        patches = self.parts.token_patches.to(per_patch.device)
        self.received.append(per_patch[:, patches].sum(-1))
        flat_keys = key.float().transpose(1, 2).flatten(2)  # [n, N, H * hd]
        self.keys.append(flat_keys[:, patches].mean(2))

    def per_image(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(received [I, T], keys [I, T, k], features [I, T, C])`` over every image of the batch."""
        if not self.received or not self.features:
            raise RuntimeError("VisionZip: the vision tower's attention or features were not read")
        features = torch.cat([f.reshape(-1, *f.shape[-2:]) for f in self.features])
        return torch.cat(self.received), torch.cat(self.keys), features


def split_counts(keep: int) -> tuple[int, int]:
    """``(dominant, contextual)`` of ``keep`` tokens at the paper's 54 : 10 split."""
    contextual = min(round(keep * CONTEXTUAL_SHARE), max(keep - 1, 0))
    return keep - contextual, contextual


@dataclass(frozen=True)
class ImageChoice:
    """One image's outcome: kept token indices (dominant and targets, sorted), and each target's
    members (the tokens averaged into it, itself first)."""

    kept: torch.Tensor
    groups: dict[int, torch.Tensor]


def choose(received: torch.Tensor, keys: torch.Tensor, keep: int) -> ImageChoice:
    """Dominant top-``K_d`` by ``received``, then ``K_c`` uniformly sampled targets among the rest,
    every other remaining token assigned to its most key-similar target."""
    count = received.shape[0]
    dominant_count, contextual_count = split_counts(keep)
    dominant = torch.topk(received.float(), dominant_count).indices
    is_dominant = torch.zeros(count, dtype=torch.bool)
    is_dominant[dominant.cpu()] = True
    remaining = (~is_dominant).nonzero().flatten()
    groups: dict[int, torch.Tensor] = {}
    if contextual_count and len(remaining):
        step = max(1, len(remaining) // contextual_count)
        targets = remaining[::step][:contextual_count]
        others = remaining[~torch.isin(remaining, targets)]
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        owner = (unit[others] @ unit[targets].T).argmax(1) if len(others) else others
        for slot, target in enumerate(targets.tolist()):
            groups[target] = torch.cat([torch.tensor([target]), others[owner == slot]])
        kept = torch.cat([dominant.cpu(), targets])
    else:
        kept = dominant.cpu()
    return ImageChoice(torch.sort(kept).values, groups)


def visionzip_plan(
    recorder: VisionZipRecorder,
    visual_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    keep_ratio: float,
) -> tuple[KeepPlan, dict[tuple[int, int], torch.Tensor]]:
    """The keep plan (per image ``keep_count(T, keep_ratio)`` tokens) and the merged embedding of each
    contextual token, keyed by ``(sample, original position)``. Images are matched to the samples'
    visual tokens in order, T tokens each (checked)."""
    received, keys, features = recorder.per_image()
    tokens = recorder.parts.token_patches.shape[0]
    kept, kept_visual, total_visual, merged = [], [], [], {}
    image = 0
    for b in range(visual_mask.shape[0]):
        visual_positions = visual_mask[b].nonzero().flatten()
        text_positions = (attention_mask[b].bool() & ~visual_mask[b]).nonzero().flatten()
        if len(visual_positions) % tokens:
            raise ValueError(f"sample {b}: {len(visual_positions)} visual tokens are not images of {tokens}")
        chosen = []
        for first in range(0, len(visual_positions), tokens):
            if image >= received.shape[0]:
                raise ValueError(
                    f"the vision tower encoded {received.shape[0]} images, the prompts need more"
                )
            positions = visual_positions[first : first + tokens]
            choice = choose(received[image], keys[image], keep_count(tokens, keep_ratio))
            chosen.append(positions[choice.kept])
            for target, members in choice.groups.items():
                group = features[image, members.to(features.device)].mean(0)
                merged[(b, int(positions[target]))] = group
            image += 1
        chosen_positions = torch.cat(chosen) if chosen else visual_positions[:0]
        kept.append(torch.sort(torch.cat([text_positions, chosen_positions])).values)
        kept_visual.append(len(chosen_positions))
        total_visual.append(len(visual_positions))
    if image != received.shape[0]:
        raise ValueError(f"the vision tower encoded {received.shape[0]} images, the prompts hold {image}")
    index, valid = pack_positions(kept, visual_mask.shape[1])
    plan = KeepPlan(index, valid, visual_mask.shape[1], tuple(kept_visual), tuple(total_visual))
    return plan, merged


class ContextualMerge:
    """Arms a VisionZip plan and writes the projected contextual tokens into their slots when the
    first decoder layer starts (a pre-hook registered after the pruner's, so it sees the pruned
    sequence)."""

    def __init__(
        self,
        recorder: VisionZipRecorder,
        visual_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        keep_ratio: float,
    ):
        self.recorder, self.visual_mask, self.attention_mask = recorder, visual_mask, attention_mask
        self.keep_ratio = keep_ratio
        self.plan: KeepPlan | None = None
        self.merged: dict[tuple[int, int], torch.Tensor] = {}
        self.merged_rows = 0

    def source(self) -> Callable[[], KeepPlan]:
        def plan() -> KeepPlan:
            self.plan, self.merged = visionzip_plan(
                self.recorder, self.visual_mask, self.attention_mask, self.keep_ratio
            )
            self.merged_rows = len(self.merged)
            return self.plan

        return plan

    @contextmanager
    def writing(self, first_layer: nn.Module) -> Iterator[ContextualMerge]:
        handle = first_layer.register_forward_pre_hook(self._write, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def _write(self, module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1 or not self.merged or self.plan is None:
            return None  # decode steps, or nothing merged
        if hidden.shape[0] != self.plan.index.shape[0]:
            raise RuntimeError("VisionZip's contextual merge does not support beam search")
        slots = self.plan.slot_of()
        keys = list(self.merged)
        rows = torch.stack([self.merged[key] for key in keys])
        projector = self.recorder.parts.projector
        with torch.no_grad():
            embeds = projector(rows[None].to(next(projector.parameters()).dtype))[0]
        hidden = hidden.clone()
        for (sample, position), embed in zip(keys, embeds, strict=True):
            hidden[sample, int(slots[sample, position])] = embed.to(hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def selection_flops(
    n_images: int,
    patches: int,
    heads: int,
    head_dim: int,
    cls: bool,
    contextual: int,
    others: int,
    key_width: int,
) -> int:
    """The recorded attention (``QK^T`` of the [CLS] row, or of every row without [CLS], per image)
    plus the key similarities of the merge (each merged token against the targets); the projector's
    run on the contextual tokens is counted by the caller."""
    rows = 1 if cls else patches
    return n_images * 2 * heads * head_dim * rows * patches + 2 * others * contextual * key_width
