"""Which visual tokens the large model keeps: the keep plan of each method, armed on the pruner.

SGL maps the guide's importance onto the large model's tokens (the same index when both models
tile alike, else by image geometry, ``lmms_sgl.method.transfer``); ``random`` seeds per sample;
FastV records the large model's own attention at layer K-1; DivPrune reads the text model's input
embeddings; PDrop arms one pruner per drop layer. A sample whose guide scores cannot be mapped
keeps all its visual tokens and is marked as a fallback with the reason.

Unit selection (``keep_units``) keeps every token of the units with the largest mapped importance
mass from layer 0 on, and ``keep_ratio`` of them by score from layer K on (two stages when K > 0);
with a plan applied before layer 0 the vision tower encodes only the units kept tokens read
(:mod:`.vision_units`).

After a run, :meth:`KeepPlanner.stages` and :meth:`KeepPlanner.selection_flops` say what each
sample's layers saw and what choosing its tokens cost (for ``pipeline.accounting``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from loguru import logger

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method import cost, divprune, visionzip
from lmms_sgl.method.fastv import fastv_plan_source, fastv_recorder
from lmms_sgl.method.pdrop import StagedPruner, drop_layers, light_attention_flops, stage_fraction
from lmms_sgl.method.pruning import VisualTokenPruner, decoder_layers
from lmms_sgl.method.selection import KeepPlan, plan_from_scores, random_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.staged_pruning import FixedStagedPruner
from lmms_sgl.method.stages import layer_tokens
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes, transfer_importance
from lmms_sgl.method.units import (
    UnitsUnavailable,
    VisualUnits,
    choose_units,
    plan_from_masks,
    top_within,
    unit_keep_mask,
)
from lmms_sgl.pipeline import vision_units
from lmms_sgl.pipeline.records import GuideScores, Sample, SampleRecord, layout_text


class KeepPlanner:
    """The large model's pruner and the keep plan of the configured method."""

    def __init__(self, large: LoadedVLM, settings: SGLSettings):
        self.large, self.settings = large, settings
        self.layer_k = settings.layer_k(large.num_layers) if settings.prunes else None
        self.pruner: VisualTokenPruner | StagedPruner | None = None
        if settings.method == "pdrop":
            layers = drop_layers(large.num_layers, self.layer_k)
            fraction = stage_fraction(layers, large.num_layers, settings.keep_ratio)
            self.pruner = StagedPruner(large.text_model, layers, fraction)
        elif settings.keep_units is not None and self.layer_k > 0:  # units from 0, tokens from K
            self.pruner = FixedStagedPruner(large.text_model, [0, self.layer_k])
        elif settings.prunes:
            self.pruner = VisualTokenPruner(large.text_model, self.layer_k)
        self.skips_units = settings.prunes and settings.skips_units(large.num_layers)
        self.unit_use: list[vision_units.UnitUse | None] | None = None  # of the last pruned batch
        self._stages: list[list[tuple[int, int]]] = []
        self._merged: list[int] = []  # VisionZip: contextual tokens per sample in the last run
        self._patches: list[list[int]] = []  # VisionZip: per sample, its images' patch counts
        self.vision_parts = large.family.visionzip_parts(large) if settings.method == "visionzip" else None

    @contextmanager
    def pruned(
        self, samples, records, inputs, visual, scores, fastv_rows=None
    ) -> Iterator[VisualTokenPruner | StagedPruner]:
        """The large model with this method's keep plan armed (and the recorder or tap it reads
        active). ``fastv_rows`` (``[B, P]`` bool, one row each) overrides FastV's and PDrop's query
        (default: the last prompt token). With unit skipping, the vision tower encodes only the units
        the plan at layer 0 needs (``unit_use``)."""
        attention_mask = inputs["attention_mask"]
        self.unit_use = None
        with ExitStack() as stack:
            if self.settings.method == "pdrop":
                query = None if fastv_rows is None else fastv_rows.long().argmax(1)
                stack.enter_context(self.pruner.installed())
                self.pruner.arm(visual, attention_mask, query)
                yield self.pruner
                self._stages = [self.pruner.stages(b) for b in range(visual.shape[0])]
                return
            if self.settings.method == "visionzip":
                if inputs.get("pixel_values_videos") is not None:
                    raise ValueError(
                        "method='visionzip' takes images only here: the tower encodes a request's videos "
                        "after all of its images, out of the prompt's order"
                    )
                recorder = stack.enter_context(visionzip.VisionZipRecorder(self.vision_parts).active())
                order = self.vision_parts.token_order
                merge = visionzip.ContextualMerge(
                    recorder,
                    visual,
                    attention_mask,
                    self.settings.keep_ratio,
                    order(inputs) if order else None,
                )
                stack.enter_context(self.pruner.installed())
                stack.enter_context(
                    merge.writing(decoder_layers(self.large.text_model)[0])
                )  # after the pruner
                self.pruner.arm(merge.source())
                yield self.pruner
                self._stages = [[(0, kept)] for kept in self.pruner.plan.kept_visual]
                self._merged = [sum(key[0] == b for key in merge.merged) for b in range(visual.shape[0])]
                self._patches = merge.patches
                return
            if self.settings.method == "divprune":
                tap = stack.enter_context(divprune.InputEmbeddingTap(self.large.text_model).active())
                source = divprune.divprune_plan_source(tap, visual, attention_mask, self.settings.keep_ratio)
            else:
                units = None
                if self.skips_units or self.settings.keep_units is not None:
                    units = self.large.family.visual_units(self.large, inputs, [s.prompt for s in samples])
                source, recorder = self._plan_source(
                    samples, records, inputs, visual, scores, fastv_rows, units
                )
                first = source[0] if isinstance(source, list) else source  # the plan at layer 0
                if self.skips_units and isinstance(first, KeepPlan):
                    hooks, self.unit_use = vision_units.skipping(self.large, units, first, visual, records)
                    stack.enter_context(hooks)
                if recorder is not None:
                    stack.enter_context(recorder.active())
            stack.enter_context(self.pruner.installed())
            self.pruner.arm(source)
            yield self.pruner
            plan = self.pruner.plan
            if isinstance(self.pruner, FixedStagedPruner):
                self._stages = [self.pruner.stages(b) for b in range(visual.shape[0])] if plan else []
            else:
                self._stages = [[(self.layer_k, kept)] for kept in plan.kept_visual] if plan else []

    def stages(self, sample: int) -> list[tuple[int, int]]:
        """``[(layer, kept visual tokens), ...]`` of ``sample`` in the last pruned run."""
        return self._stages[sample]

    def selection_flops(self, sample: int, prompt: int, n_visual: int) -> float:
        """What choosing ``sample``'s tokens cost beyond the forward itself: FastV's and PDrop's
        recorded attention rows (one query over the keys of each ranking layer), DivPrune's Gram
        matrix of the visual embeddings."""
        shape, method = self.large.text_shape, self.settings.method
        one_row = cost.recording_flops(replace(shape, num_layers=1), 1, 1, 0)  # one query, one key
        if method == "fastv":
            return one_row * prompt
        if method == "pdrop":
            seen = layer_tokens(shape.num_layers, prompt, n_visual, self.stages(sample))
            return sum(light_attention_flops(shape, seen[layer - 1]) for layer in self.pruner.layers)
        if method == "divprune":
            return divprune.selection_flops(n_visual, self.stages(sample)[0][1], shape.hidden)
        if method == "visionzip":
            return self._visionzip_flops(sample, n_visual)
        return 0.0

    def _visionzip_flops(self, sample: int, n_visual: int) -> float:
        """The recorded vision attention of each image, the merge's key similarities and the
        projector's run on the merged tokens."""
        parts = self.vision_parts
        heads, head_dim = parts.attention.num_heads, parts.attention.head_dim
        merged, kept = self._merged[sample], self.stages(sample)[0][1]
        work = visionzip.selection_flops(
            self._patches[sample],
            heads,
            head_dim,
            parts.cls_index is not None,
            merged,
            n_visual - kept,
            head_dim,  # the keys are averaged over heads
        )
        linears = [m for m in parts.projector.modules() if isinstance(m, torch.nn.Linear)]
        return work + sum(2 * merged * m.in_features * m.out_features for m in linears)

    def _plan_source(
        self, samples: list[Sample], records: list[SampleRecord], inputs, visual, scores, fastv_rows, units
    ):
        """The keep plan for this method, and the FastV recorder if one must be active.

        ``scores`` (:class:`GuideScores` per sample, or ``None`` to keep everything) are mapped onto
        the large model's tokens (:func:`large_scores`). ``fastv_rows`` overrides FastV's query rows
        (default: last prompt row).
        """
        attention_mask = inputs["attention_mask"]
        method = self.settings.method
        if method == "fastv":
            recorder = fastv_recorder(attention_mask, self.layer_k, fastv_rows)
            return fastv_plan_source(recorder, visual, attention_mask, self.settings.keep_ratio), recorder
        if method == "random":
            per_sample = random_scores(visual.cpu(), self.settings.seed, [s.key for s in samples])
        else:
            per_sample = []
            counts = visual.sum(1).tolist()
            large_boxes = None
            if scores is not None:
                large_boxes = self.large.family.visual_boxes(self.large, inputs, [s.prompt for s in samples])
            for b, record in enumerate(records):
                if scores is None:
                    per_sample.append(None)
                    continue
                record.extra["large_layout"] = layout_text(large_boxes[b])
                per_sample.append(large_scores(scores[b], large_boxes[b], counts[b], record))
            if self.settings.keep_units is not None:
                pairs = [
                    self._unit_masks(s, u, record)
                    for s, u, record in zip(per_sample, units, records, strict=True)
                ]
                kept = plan_from_masks([inner for _, inner in pairs], visual, attention_mask)
                if isinstance(self.pruner, FixedStagedPruner):  # every unit token until layer K
                    units_plan = plan_from_masks([outer for outer, _ in pairs], visual, attention_mask)
                    return [units_plan, kept], None
                return kept, None
        return plan_from_scores(per_sample, visual, attention_mask, self.settings.keep_ratio), None

    def _unit_masks(
        self, scores: torch.Tensor | None, units: VisualUnits | UnitsUnavailable, record: SampleRecord
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The visual tokens unit selection keeps for one sample: those of the chosen units (seen
        from layer 0) and the top ``keep_ratio`` of them by score (seen from layer K); ``None``:
        all of them."""
        if scores is None:  # the guide's scores could not be mapped: already a counted fallback
            return None, None
        everything = torch.ones(len(scores), dtype=torch.bool)
        if isinstance(units, UnitsUnavailable):
            record.fallback = f"unit selection impossible ({units}); token selection instead"
            logger.warning(f"{record.task}/{record.doc_id}: {record.fallback}")
            return None, top_within(scores, everything, self.settings.keep_ratio)
        chosen = choose_units(units, scores, self.settings.keep_units, self.settings.keep_global_view)
        record.extra["units_kept"] = int(chosen.sum())
        record.extra["global_views_kept"] = int((chosen & units.global_view).sum())
        if bool(chosen.all()):  # one unit, or N covers them all: a counted no-op
            record.extra["unit_selection_noop"] = True
        in_units = unit_keep_mask(units, chosen)
        return in_units, top_within(scores, in_units, self.settings.keep_ratio)


def large_scores(
    scores: GuideScores, large: TokenBoxes | BoxesUnavailable, count: int, record: SampleRecord
) -> torch.Tensor | None:
    """One score per large visual token: the guide's own when both models tile alike (or the
    boxes are unknown but the counts match: index transfer), else mapped by geometry; ``None``
    (keep everything, a counted fallback) when neither is possible."""
    guide = scores.boxes
    known = not isinstance(guide, BoxesUnavailable) and not isinstance(large, BoxesUnavailable)
    if known and guide.same_layout(large):
        return scores.values
    if known:
        try:
            mapped = transfer_importance(scores.values, guide, large)
        except BoxesUnavailable as error:
            reason = f"geometric transfer failed: {error}"
        else:
            record.extra["transfer"] = "geometric"
            return mapped
    elif len(scores) == count:
        return scores.values
    else:
        unknown = guide if isinstance(guide, BoxesUnavailable) else large
        which = "guide" if unknown is guide else "large model"
        reason = f"{which} token boxes unknown ({unknown})"
    record.fallback = (
        f"layout mismatch: guide has {len(scores)} visual tokens, large model has {count}; "
        f"{reason}; kept all visual tokens"
    )
    logger.warning(f"{record.task}/{record.doc_id}: {record.fallback}")
    return None
