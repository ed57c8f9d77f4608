"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant plus merged contextual tokens,
chosen by the *vision tower's* attention, before the language model (K = 0).

Followed: the official code, ``dvlab-research/VisionZip`` at commit
``3151f6df4fca36a4cd1c985e5956e725b1f9ad02``: ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``), ``visionzip/utils.py`` (``CLIPAttention_forward``: the
metric) and ``visionzip/main.py`` (``dominant_num = dominant - 1``). Per image (per tile):

* **dominant tokens**: [CLS] plus the ``K_d - 1`` patches with the highest attention from [CLS]
  (summed over heads) in the vision layer whose output the projector reads: [CLS] counts as one of
  the ``K_d`` (64 = [CLS] + 53 + 10 for LLaVA-1.5);
* **contextual tokens**: of the ``R`` remaining tokens, ``K_c`` *targets* every ``R // K_c``-th in
  order; every other remaining token is assigned to the target whose key is most cosine-similar,
  the key being that layer's ``k_proj`` output **averaged over heads**; a contextual token is the
  target's feature **plus the mean** of its assigned tokens' features (the target alone when none
  was assigned), in the feature space the projector reads, then projected;
* the paper's splits are 54 + 10 (64), 108 + 20 (128), 162 + 30 (192), so ``K_c = round(keep *
  10 / 64)`` here, with ``keep = keep_count(T, keep_ratio)`` per image.

Deliberate differences, each needed by the families or the package:

* [CLS] takes its place in the dominant budget but is not fed to the language model: the families'
  LM sequences (LLaVA-1.5 with strategy ``default``, InternVL) have one slot per patch token and
  none for [CLS]. So the LM sees one token fewer per image than the official code gives it (63 of
  64); the run's token ratio reports what the LM saw.
* placement: the official code feeds the LLM [CLS], the dominant tokens, then the contextual ones,
  as a shorter renumbered sequence. Here every kept token keeps its original RoPE position, as for
  every other method of the package (needed for Qwen-VL's multimodal positions, and for SGL's own
  rule): a dominant token its own, a contextual token the slot and position of its target.
* ``keep_ratio=1`` keeps every token untouched (the unpruned model), not [CLS] + all but one.
* LLaVA-NeXT (the official ``llava_arch.py`` selects the base image and each crop on its own): each
  crop's selection runs among the patches that survive unpadding (the official code scatters them
  back into the padded grid) and newline tokens are not kept (its multi-crop path feeds none).

Extensions of this package, where the official code has no counterpart (labelled as such in
docs/baselines.md):

* InternVL: [CLS] at 0 as in CLIP; an LM token gathers the 2 x 2 patches of the pixel shuffle, its
  score is the attention summed over them, its key the mean of their keys, its feature the shuffled
  feature the projector receives;
* Qwen2-VL / Qwen2.5-VL (towers without [CLS], images of any size): the score is the attention
  every query of the image pays in the last block (averaged over heads and queries, summed over the
  2 x 2 merged patches), images are matched to their LM tokens one after another, and Qwen2.5-VL's
  tokens, which the tower holds in attention-window order, are put back in the LM's order
  (``VisionZipParts.token_order``).

Reading the tower's attention goes through transformers' ``AttentionInterface``: the vision tower
runs :data:`VISION_ATTENTION_NAME`, ordinary SDPA that, while a :class:`VisionZipRecorder` is
active, also computes the probabilities of the one recorded layer (the [CLS] row, or every row for
the mean received) and keeps that layer's keys.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lmms_sgl.method.pruning import decoder_layers
from lmms_sgl.method.registry import (
    BEFORE_LM,
    KeepMethod,
    MethodRun,
    PlanBatch,
    register,
    single_stage_reader,
)
from lmms_sgl.method.selection import KeepPlan, keep_count, pack_positions

VISION_ATTENTION_NAME = "sgl_vision_record"
CONTEXTUAL_SHARE = 10 / 64  # the paper's 54 dominant + 10 contextual of 64

_ACTIVE: contextvars.ContextVar[VisionZipRecorder | None] = contextvars.ContextVar(
    "sgl_visionzip", default=None
)


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's LM tokens come from: ``rows`` rows of the tower's input (crops), and per LM
    token ``source[t] = (row, token)`` within them, ``(-1, -1)`` for tokens read from no row
    (LLaVA-NeXT's image-newline tokens)."""

    rows: int
    source: torch.Tensor  # [T, 2] long

    @staticmethod
    def single(tokens: int) -> ImageLayout:
        """One row, its tokens in order."""
        return ImageLayout(1, torch.stack([torch.zeros(tokens, dtype=torch.long), torch.arange(tokens)], 1))


@dataclass(frozen=True)
class VisionZipParts:
    """Where a family's VisionZip quantities live.

    Attributes:
        attention: the attention module of the vision layer the projector's features come from.
        projector: the module mapping per-token vision features to LM embeddings.
        token_patches: ``[T, G]`` key indices (in the recorded layer's sequence) of the patches
            each of an image's T language-model tokens gathers; ``None`` for towers whose images
            vary in size (Qwen-VL): each LM token is then ``group`` consecutive patches of the
            image's sequence.
        cls_index: the [CLS] token's index in that sequence, ``None`` if the tower has none.
        group: patches per LM token when ``token_patches`` is ``None``.
        flat_features: the projector takes every patch of the batch as one ``[N, C]`` matrix and
            gathers each LM token's ``group`` rows itself (Qwen-VL's merger); otherwise it takes
            ``[images, T, C]``, one row per LM token.
        token_order: for towers that reorder an image's tokens inside (Qwen2.5-VL's attention
            windows): from the batch inputs, per image, the LM index of each token in the order the
            tower holds them; ``None``: the tower keeps the LM order.
        image_layouts: for families whose images take several rows of the tower's input and whose
            LM tokens are rearranged between tower and LM (LLaVA-NeXT: base image and crops,
            unpadded, with newline tokens): from the batch inputs, per image, which row and token
            each LM token comes from; ``None``: every tower row is one image, its LM tokens in order.
    """

    attention: nn.Module
    projector: nn.Module
    token_patches: torch.Tensor | None
    cls_index: int | None
    group: int = 1
    flat_features: bool = False
    token_order: Callable[[dict], list[torch.Tensor]] | None = None
    image_layouts: Callable[[dict], list[ImageLayout]] | None = None

    def patches_of(self, sequence: int) -> torch.Tensor:
        """``[T, G]``: the patches each LM token of an image with ``sequence`` keys gathers."""
        if self.token_patches is not None:
            return self.token_patches
        if sequence % self.group:
            raise ValueError(f"VisionZip: {sequence} patches do not form tokens of {self.group}")
        return torch.arange(sequence).view(-1, self.group)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """LM embeddings ``[M, D]`` of merged projector inputs ``[M, F]`` (one row per LM token)."""
        dtype = next(self.projector.parameters()).dtype
        if self.flat_features:
            return self.projector(rows.reshape(rows.shape[0] * self.group, -1).to(dtype))
        return self.projector(rows[None].to(dtype))[0]


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
        self.received: list[torch.Tensor] = []  # per image: [T]
        self.keys: list[torch.Tensor] = []  # per image: [T, H * hd]
        self.patches: list[int] = []  # per image: keys in the recorded layer's sequence
        self.features: list[torch.Tensor] = []  # per projector call: [n, T, C], or [N, C] if flat
        self.read = False  # per_image() has been called: the tower's features are complete

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
        if not self.read:  # later calls are the contextual merge projecting its own rows
            self.features.append(args[0].detach())

    def observe(self, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> None:
        """``query``/``key`` ``[n, H, N, hd]`` (n images of N keys each, or one image per call where
        images differ in size): scores per patch key, then gathered per LM token."""
        if attention_mask is not None:
            raise RuntimeError("VisionZip expects the vision tower's full (unmasked) attention")
        cls = self.parts.cls_index
        rows = query[:, :, cls : cls + 1] if cls is not None else query
        probs = torch.softmax((rows.float() @ key.float().transpose(-1, -2)) * scaling, dim=-1)
        per_patch = probs.mean(dim=(1, 2))  # heads (and, without [CLS], queries) averaged: [n, N]
        patches = self.parts.patches_of(key.shape[2]).to(per_patch.device)
        head_mean_keys = key.float().mean(1)  # [n, N, hd]: the official metric, keys averaged over heads
        self.received += list(per_patch[:, patches].sum(-1))
        self.keys += list(head_mean_keys[:, patches].mean(2))
        self.patches += [key.shape[2]] * key.shape[0]

    def per_image(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(received [T_i], keys [T_i, k], features [T_i, F])`` of every image of the batch, in
        the order the tower encoded them."""
        if not self.received or not self.features:
            raise RuntimeError("VisionZip: the vision tower's attention or features were not read")
        self.read = True
        if not self.parts.flat_features:
            features = torch.cat([f.reshape(-1, *f.shape[-2:]) for f in self.features])
            return self.received, self.keys, list(features)
        rows = torch.cat(self.features)  # [N, C]: every patch, images one after another
        if rows.shape[0] != sum(self.patches):
            raise RuntimeError(f"VisionZip: {rows.shape[0]} projector rows for {sum(self.patches)} patches")
        per_image = torch.split(rows, self.patches)
        group = self.parts.group
        return self.received, self.keys, [f.reshape(f.shape[0] // group, -1) for f in per_image]


def split_counts(keep: int) -> tuple[int, int]:
    """``(dominant, contextual)`` of ``keep`` tokens at the paper's 54 : 10 split."""
    contextual = min(round(keep * CONTEXTUAL_SHARE), max(keep - 1, 0))
    return keep - contextual, contextual


def dominant_patches(dominant: int, contextual: int, has_cls: bool) -> int:
    """How many of an image's tokens are dominant: the official code counts [CLS] as the first of
    the ``dominant`` (``dominant_num = dominant - 1`` in ``main.py``), so a tower with [CLS] gives
    one fewer to its patches. [CLS] has no slot in the language model's sequence here, so it is
    not fed; at least one token is kept when no contextual token is."""
    patches = dominant - 1 if has_cls else dominant
    return max(patches, 0 if contextual else 1)


@dataclass(frozen=True)
class ImageChoice:
    """One image's outcome: kept token indices (dominant and targets, sorted), and each target's
    members (the tokens merged into it, itself first)."""

    kept: torch.Tensor
    groups: dict[int, torch.Tensor]


def choose(received: torch.Tensor, keys: torch.Tensor, keep: int, has_cls: bool = True) -> ImageChoice:
    """The official rule (``CLIPVisionTower_VisionZip.forward``): dominant top-``K_d`` by
    ``received`` ([CLS] counted among them when the tower has one), then ``K_c`` targets every
    ``R // K_c``-th of the ``R`` remaining tokens, every other remaining token assigned to its most
    cosine-similar target by ``keys`` (head-averaged)."""
    count = received.shape[0]
    if keep >= count:  # nothing to drop: every token as it is (keep_ratio=1 is the unpruned model)
        return ImageChoice(torch.arange(count), {})
    dominant_count, contextual_count = split_counts(keep)
    dominant_count = min(dominant_patches(dominant_count, contextual_count, has_cls), count)
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


def contextual_value(features: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """The official contextual token: the target's feature plus the mean of the tokens assigned to
    it (``target_hidden + aggregated_hidden``; the target alone when nothing was assigned)."""
    target = features[members[0]]
    if len(members) == 1:
        return target
    return target + features[members[1:]].mean(0)


@dataclass(frozen=True)
class VisionZipOutcome:
    """A batch's VisionZip result: the keep plan, the merged projector input of each contextual
    token keyed by ``(sample, original position)``, and per sample its images' patch counts (for
    the selection cost)."""

    plan: KeepPlan
    merged: dict[tuple[int, int], torch.Tensor]
    patches: list[list[int]]


def in_lm_order(
    per_image: tuple[list[torch.Tensor], ...], orders: list[torch.Tensor] | None
) -> tuple[list[torch.Tensor], ...]:
    """Each image's rows moved from the tower's token order to the LM's (``orders[i][j]``: the LM
    index of the tower's j-th token of image i)."""
    if orders is None:
        return per_image
    if len(orders) != len(per_image[0]):
        raise ValueError(f"VisionZip: {len(orders)} token orders for {len(per_image[0])} encoded images")
    back = [torch.argsort(order) for order in orders]
    return tuple(
        [rows[b.to(rows.device)] for rows, b in zip(values, back, strict=True)] for values in per_image
    )


def visionzip_plan(
    recorder: VisionZipRecorder,
    visual_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    keep_ratio: float,
    orders: list[torch.Tensor] | None = None,
    layouts: list[ImageLayout] | None = None,
) -> VisionZipOutcome:
    """Per row of the tower's input (image, tile or crop), ``keep_count(T, keep_ratio)`` of the T
    tokens that reach the LM from it, chosen by :func:`choose` among them. Images are matched to the
    samples' visual tokens in order, each taking as many positions as its layout has LM tokens
    (checked); tokens read from no row (newlines) are not kept, as the official LLaVA-NeXT code
    feeds none. ``orders`` as in :func:`in_lm_order`; ``layouts`` as in
    :attr:`VisionZipParts.image_layouts`."""
    received, keys, features = in_lm_order(recorder.per_image(), orders)
    has_cls = recorder.parts.cls_index is not None
    kept, kept_visual, total_visual, merged, patches = [], [], [], {}, []
    row, image = 0, 0
    for b in range(visual_mask.shape[0]):
        visual_positions = visual_mask[b].nonzero().flatten()
        text_positions = (attention_mask[b].bool() & ~visual_mask[b]).nonzero().flatten()
        chosen, first, patches_b = [], 0, []
        while first < len(visual_positions):
            if row >= len(received) or (layouts is not None and image >= len(layouts)):
                raise ValueError(f"the vision tower encoded {len(received)} rows, the prompts need more")
            layout = layouts[image] if layouts is not None else ImageLayout.single(len(received[row]))
            span = len(layout.source)
            if first + span > len(visual_positions) or row + layout.rows > len(received):
                raise ValueError(
                    f"sample {b}: {len(visual_positions)} visual tokens do not end with a whole image "
                    f"({span} tokens from position {first})"
                )
            positions = visual_positions[first : first + span]
            if keep_ratio >= 1:  # nothing to drop, newlines included: the unpruned model
                chosen.append(positions)
                patches_b += recorder.patches[row : row + layout.rows]
                row, first, image = row + layout.rows, first + span, image + 1
                continue
            for offset in range(layout.rows):
                ordinals = (layout.source[:, 0] == offset).nonzero().flatten()
                tokens = layout.source[ordinals, 1]
                lm = positions[ordinals.to(positions.device)]
                choice = choose(
                    received[row][tokens.to(received[row].device)],
                    keys[row][tokens.to(keys[row].device)],
                    keep_count(len(tokens), keep_ratio),
                    has_cls,
                )
                chosen.append(lm[choice.kept.to(lm.device)])
                row_features = features[row][tokens.to(features[row].device)]
                for target, members in choice.groups.items():
                    value = contextual_value(row_features, members.to(row_features.device))
                    merged[(b, int(lm[target]))] = value
                patches_b.append(recorder.patches[row])
                row += 1
            first += span
            image += 1
        chosen_positions = torch.sort(torch.cat(chosen)).values if chosen else visual_positions[:0]
        kept.append(torch.sort(torch.cat([text_positions, chosen_positions])).values)
        kept_visual.append(len(chosen_positions))
        total_visual.append(len(visual_positions))
        patches.append(patches_b)
    if row != len(received):
        raise ValueError(f"the vision tower encoded {len(received)} rows, the prompts hold {row}")
    index, valid = pack_positions(kept, visual_mask.shape[1])
    plan = KeepPlan(index, valid, visual_mask.shape[1], tuple(kept_visual), tuple(total_visual))
    return VisionZipOutcome(plan, merged, patches)


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
        orders: list[torch.Tensor] | None = None,
        layouts: list[ImageLayout] | None = None,
    ):
        self.recorder, self.visual_mask, self.attention_mask = recorder, visual_mask, attention_mask
        self.keep_ratio, self.orders, self.layouts = keep_ratio, orders, layouts
        self.plan: KeepPlan | None = None
        self.merged: dict[tuple[int, int], torch.Tensor] = {}
        self.merged_rows = 0
        self.patches: list[list[int]] = []  # per sample: its images' patch counts

    def source(self) -> Callable[[], KeepPlan]:
        def plan() -> KeepPlan:
            outcome = visionzip_plan(
                self.recorder,
                self.visual_mask,
                self.attention_mask,
                self.keep_ratio,
                self.orders,
                self.layouts,
            )
            self.plan, self.merged, self.patches = outcome.plan, outcome.merged, outcome.patches
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
        with torch.no_grad():
            embeds = self.recorder.parts.project(rows)
        hidden = hidden.clone()
        for (sample, position), embed in zip(keys, embeds, strict=True):
            hidden[sample, int(slots[sample, position])] = embed.to(hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


def selection_flops(
    patches: list[int],
    heads: int,
    head_dim: int,
    cls: bool,
    contextual: int,
    others: int,
    key_width: int,
) -> int:
    """The recorded attention (``QK^T`` of the [CLS] row, or of every row without [CLS], of each
    image of ``patches`` keys) plus the key similarities of the merge (each merged token against the
    targets); the projector's run on the contextual tokens is counted by the caller."""
    recorded = sum(2 * heads * head_dim * (1 if cls else n) * n for n in patches)
    return recorded + 2 * others * contextual * key_width


@register
class VisionZip(KeepMethod):
    name = "visionzip"
    vision_attention = True
    layers = BEFORE_LM

    def check_checkpoint(self, family, path: str, argument: str) -> None:
        family.check_visionzip(path, argument)

    def arm(self, batch: PlanBatch, stack: ExitStack) -> MethodRun:
        if batch.inputs.get("pixel_values_videos") is not None:
            raise ValueError(
                "method='visionzip' takes images only here: the tower encodes a request's videos "
                "after all of its images, out of the prompt's order"
            )
        large = batch.large
        parts = large.family.visionzip_parts(large)
        recorder = stack.enter_context(VisionZipRecorder(parts).active())
        order = parts.token_order(batch.inputs) if parts.token_order else None
        layouts = parts.image_layouts(batch.inputs) if parts.image_layouts else None
        merge = ContextualMerge(
            recorder, batch.visual, batch.attention_mask, batch.settings.keep_ratio, order, layouts
        )
        stack.enter_context(batch.pruner.installed())
        stack.enter_context(merge.writing(decoder_layers(large.text_model)[0]))  # after the pruner
        batch.pruner.arm(merge.source())

        def flops(sample: int, prompt: int, n_visual: int, stages) -> float:
            """The recorded vision attention of each image, the merge's key similarities and the
            projector's run on the merged tokens."""
            merged = sum(key[0] == sample for key in merge.merged)
            heads, head_dim = parts.attention.num_heads, parts.attention.head_dim
            kept = stages[0][1]
            work = selection_flops(
                merge.patches[sample],
                heads,
                head_dim,
                parts.cls_index is not None,
                merged,
                n_visual - kept,
                head_dim,
            )
            linears = [m for m in parts.projector.modules() if isinstance(m, torch.nn.Linear)]
            return work + sum(2 * merged * m.in_features * m.out_features for m in linears)

        return MethodRun(single_stage_reader(batch), selection_flops=flops)
