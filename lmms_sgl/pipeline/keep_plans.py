"""Which visual tokens the large model keeps: the keep plan of each method, armed on the pruner.

SGL maps the guide's importance onto the large model's tokens (the same index when both models
tile alike, else by image geometry, ``lmms_sgl.method.transfer``); ``random`` seeds per sample;
FastV records the large model's own attention at layer K-1. A sample whose guide scores cannot be
mapped keeps all its visual tokens and is marked as a fallback with the reason.

Unit selection (``keep_units``) keeps every token of the units with the largest mapped importance
mass (and ``keep_ratio`` of them by score); with a plan applied before layer 0 the vision tower
encodes only the units kept tokens read (:mod:`.vision_units`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from loguru import logger

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method.fastv import fastv_plan_source, fastv_recorder
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import KeepPlan, plan_from_scores, random_scores
from lmms_sgl.method.settings import SGLSettings
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
        self.pruner = VisualTokenPruner(large.text_model, self.layer_k) if settings.prunes else None
        self.skips_units = settings.prunes and settings.skips_units(large.num_layers)
        self.unit_use: list[vision_units.UnitUse | None] | None = None  # of the last pruned batch

    @contextmanager
    def pruned(
        self, samples, records, inputs, visual, scores, fastv_rows=None
    ) -> Iterator[VisualTokenPruner]:
        """The large model with this method's keep plan armed (and FastV's recorder active); with
        unit skipping, its vision tower encodes only the units the plan needs (``unit_use``)."""
        units = None
        if self.skips_units or self.settings.keep_units is not None:
            units = self.large.family.visual_units(self.large, inputs, [s.prompt for s in samples])
        self.unit_use = None
        source, recorder = self._plan_source(samples, records, inputs, visual, scores, fastv_rows, units)
        with ExitStack() as stack:
            if self.skips_units and isinstance(source, KeepPlan):
                hooks, self.unit_use = vision_units.skipping(self.large, units, source, visual, records)
                stack.enter_context(hooks)
            stack.enter_context(self.pruner.installed())
            if recorder is not None:
                stack.enter_context(recorder.active())
            self.pruner.arm(source)
            yield self.pruner

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
                masks = [
                    self._unit_mask(s, u, record)
                    for s, u, record in zip(per_sample, units, records, strict=True)
                ]
                return plan_from_masks(masks, visual, attention_mask), None
        return plan_from_scores(per_sample, visual, attention_mask, self.settings.keep_ratio), None

    def _unit_mask(
        self, scores: torch.Tensor | None, units: VisualUnits | UnitsUnavailable, record: SampleRecord
    ) -> torch.Tensor | None:
        """The visual tokens unit selection keeps for one sample (``None``: all of them)."""
        if scores is None:  # the guide's scores could not be mapped: already a counted fallback
            return None
        everything = torch.ones(len(scores), dtype=torch.bool)
        if isinstance(units, UnitsUnavailable):
            record.fallback = f"unit selection impossible ({units}); token selection instead"
            logger.warning(f"{record.task}/{record.doc_id}: {record.fallback}")
            return top_within(scores, everything, self.settings.keep_ratio)
        chosen = choose_units(units, scores, self.settings.keep_units, self.settings.keep_global_view)
        record.extra["units_kept"] = int(chosen.sum())
        if bool(chosen.all()):  # one unit, or N covers them all: a counted no-op
            record.extra["unit_selection_noop"] = True
        return top_within(scores, unit_keep_mask(units, chosen), self.settings.keep_ratio)


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
