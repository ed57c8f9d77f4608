"""SGL's keep plan (SGP): the guide's importance, mapped onto the large model's visual tokens, keeps
the top ``keep_ratio`` from layer K on (the paper's rule, ``selection=topk``), or the most important
tokens spread over the image (``selection=spread``, :mod:`lmms_sgl.method.spread`).

The guide's scores travel with the boxes of the guide's visual tokens: when both models tile
alike the scores are the large model's as they are, else they are mapped by image geometry
(:mod:`lmms_sgl.method.transfer`). A sample whose scores cannot be mapped keeps all its visual
tokens and is marked as a fallback with the reason.

Unit selection (``keep_units``) keeps every token of the units with the largest mapped importance
mass from layer 0 on, and ``keep_ratio`` of them by score from layer K on (two stages when K > 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from loguru import logger

from lmms_sgl.method.once import warn_once
from lmms_sgl.method.registry import PlanBatch, ScoredMethod, register
from lmms_sgl.method.selection import KeepPlan, keep_count, plan_from_scores
from lmms_sgl.method.spread import spread_select
from lmms_sgl.method.staged_pruning import FixedStagedPruner
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes, layout_text, transfer_importance
from lmms_sgl.method.units import (
    UnitsUnavailable,
    VisualUnits,
    choose_units,
    plan_from_masks,
    top_within,
    unit_keep_mask,
)

if TYPE_CHECKING:  # duck-typed: the pipeline's records are written, never imported here
    from lmms_sgl.pipeline.records import GuideScores, SampleRecord


@register
class SGL(ScoredMethod):
    name = "sgl"
    guided = True
    drafts = True

    def make_pruner(self, large, settings, layer_k: int):
        if settings.keep_units is not None and layer_k > 0:  # units from 0, tokens from K
            return FixedStagedPruner(large.text_model, [0, layer_k])
        return super().make_pruner(large, settings, layer_k)

    def plan_source(self, batch: PlanBatch) -> KeepPlan | list[KeepPlan]:
        per_sample, boxes = self.mapped_scores(batch)
        settings = batch.settings
        rule = settings.token_selection(batch.layer_k)
        spread = rule == "spread"
        if settings.keep_units is None and not spread:
            return plan_from_scores(per_sample, batch.visual, batch.attention_mask, settings.keep_ratio)
        if settings.keep_units is None:
            inner = [
                spread_mask(scores, sample_boxes, None, record, settings)
                for scores, sample_boxes, record in zip(per_sample, boxes, batch.records, strict=True)
            ]
            return plan_from_masks(inner, batch.visual, batch.attention_mask)
        pairs = [
            unit_masks(scores, units, sample_boxes, record, settings, rule)
            for scores, units, sample_boxes, record in zip(
                per_sample, batch.units, boxes, batch.records, strict=True
            )
        ]
        kept = plan_from_masks([inner for _, inner in pairs], batch.visual, batch.attention_mask)
        if isinstance(batch.pruner, FixedStagedPruner):  # every unit token until layer K
            units_plan = plan_from_masks([outer for outer, _ in pairs], batch.visual, batch.attention_mask)
            return [units_plan, kept]
        return kept

    def token_scores(self, batch: PlanBatch) -> list[torch.Tensor | None]:
        return self.mapped_scores(batch)[0]

    def mapped_scores(self, batch: PlanBatch) -> tuple[list[torch.Tensor | None], list]:
        """The guide's scores on the large model's tokens, per sample (``None``: keep all), and the
        large model's token boxes (or why they are unknown; ``None`` without scores)."""
        n = batch.visual.shape[0]
        if batch.scores is None:
            return [None] * n, [None] * n
        large = batch.large
        boxes = large.family.visual_boxes(large, batch.inputs, [s.prompt for s in batch.samples])
        counts = batch.visual.sum(1).tolist()
        out = []
        for b, record in enumerate(batch.records):
            record.extra["large_layout"] = layout_text(boxes[b])
            out.append(large_scores(batch.scores[b], boxes[b], counts[b], record))
        return out, boxes


def spread_mask(
    scores: torch.Tensor | None,
    boxes: TokenBoxes | BoxesUnavailable | None,
    allowed: torch.Tensor | None,
    record: SampleRecord,
    settings,
) -> torch.Tensor | None:
    """``[N]`` bool: ``selection=spread`` among the ``allowed`` tokens (``None``: all), keeping
    ``keep_count(n_allowed, keep_ratio)`` as top-k would; where the large model's token boxes are
    unknown (videos, some layouts) it is top-k, recorded in the sample's record."""
    if scores is None:  # the guide's scores could not be mapped: already a counted fallback
        return None
    allowed = torch.ones(len(scores), dtype=torch.bool) if allowed is None else allowed
    if not isinstance(boxes, TokenBoxes) or len(boxes) != len(scores):
        reason = boxes if isinstance(boxes, BoxesUnavailable) else "token boxes do not match the scores"
        record.extra["selection"] = f"topk (spread impossible: {reason})"
        warn_once(
            f"spread:{reason}",
            f"{record.task}/{record.doc_id}: {record.extra['selection']} (said once; every such sample's "
            "record notes it)",
        )
        return top_within(scores, allowed, settings.keep_ratio)
    count = keep_count(int(allowed.sum()), settings.keep_ratio)
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[spread_select(scores, boxes, count, settings.spread_radius, allowed)] = True
    record.extra["selection"] = f"spread r={settings.spread_radius}"
    return mask


def unit_masks(
    scores: torch.Tensor | None,
    units: VisualUnits | UnitsUnavailable,
    boxes: TokenBoxes | BoxesUnavailable | None,
    record: SampleRecord,
    settings,
    rule: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The visual tokens unit selection keeps for one sample: those of the chosen units (seen from
    layer 0) and ``keep_ratio`` of them chosen by the selection rule (seen from layer K); ``None``:
    all of them."""
    if scores is None:  # the guide's scores could not be mapped: already a counted fallback
        return None, None
    everything = torch.ones(len(scores), dtype=torch.bool)
    if isinstance(units, UnitsUnavailable):
        record.fallback = f"unit selection impossible ({units}); token selection instead"
        logger.warning(f"{record.task}/{record.doc_id}: {record.fallback}")
        return None, within(scores, everything, boxes, record, settings, rule)
    chosen = choose_units(units, scores, settings.keep_units, settings.keep_global_view)
    record.extra["units_kept"] = int(chosen.sum())
    record.extra["global_views_kept"] = int((chosen & units.global_view).sum())
    if bool(chosen.all()):  # one unit, or N covers them all: a counted no-op
        record.extra["unit_selection_noop"] = True
    in_units = unit_keep_mask(units, chosen)
    return in_units, within(scores, in_units, boxes, record, settings, rule)


def within(scores, allowed: torch.Tensor, boxes, record: SampleRecord, settings, rule: str) -> torch.Tensor:
    """``keep_ratio`` of the ``allowed`` tokens by ``rule`` (``topk`` or ``spread``)."""
    if rule == "spread":
        return spread_mask(scores, boxes, allowed, record, settings)
    return top_within(scores, allowed, settings.keep_ratio)


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
