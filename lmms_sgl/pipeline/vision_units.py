"""Pay only for what is kept: which vision units the large model encodes for a batch, and what they cost.

With a keep plan applied before the large model's first decoder layer, a unit (tile, crop, image)
that no kept token reads is not encoded at all (:mod:`lmms_sgl.method.units`). The batch's rows
are known only when every sample's units are: one sample whose units cannot be derived turns
skipping off for its batch (nothing counted as skipped, the reason in the record).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method.selection import KeepPlan
from lmms_sgl.method.units import UnitsUnavailable, VisualUnits, kept_visual_mask, units_to_encode
from lmms_sgl.pipeline.records import SampleRecord


@dataclass(frozen=True)
class UnitUse:
    """One sample's vision units: how many there are, how many were encoded, their FLOPs."""

    total: int
    encoded: int
    vision_flops: float  # of the encoded units


def skipping(
    large: LoadedVLM,
    units: list[VisualUnits | UnitsUnavailable],
    plan: KeepPlan,
    visual: torch.Tensor,
    records: list[SampleRecord],
) -> tuple[AbstractContextManager, list[UnitUse | None]]:
    """The hooks that make the large model's vision tower encode only the units ``plan`` needs
    (a no-op context when nothing can be skipped), and each sample's use."""
    unknown = [u for u in units if isinstance(u, UnitsUnavailable)]
    if unknown:
        for record, item in zip(records, units, strict=True):
            if isinstance(item, UnitsUnavailable):
                record.extra["unit_skipping"] = f"off for this batch: units unknown ({item})"
        return nullcontext(), [None] * len(units)
    needed = []
    for b, sample_units in enumerate(units):
        kept = kept_visual_mask(plan.index[b].cpu(), plan.valid[b].cpu(), visual[b].cpu())
        needed.append(units_to_encode(sample_units, kept).tolist())
    flat = [flag for flags in needed for flag in flags]
    owners = [b for b, u in enumerate(units) if u.count]
    if not any(flat) and owners:  # kept tokens that read no unit (newlines only): encode one row, counted
        needed[owners[0]][0] = True
        flat = [flag for flags in needed for flag in flags]
    uses = [
        UnitUse(u.count, sum(flags), float(sum(f for f, on in zip(u.flops, flags, strict=True) if on)))
        for u, flags in zip(units, needed, strict=True)
    ]
    if all(flat):
        return nullcontext(), uses
    sizes = [rows for u in units for rows in u.rows]
    hooks = large.family.unit_skip_hooks(sizes, flat)
    return hooks.installed(*large.family.vision_modules(large.model)), uses


def full_use(units: list[VisualUnits | UnitsUnavailable], vision: list[float]) -> list[UnitUse | None]:
    """Every unit encoded (no plan before layer 0, or skipping off)."""
    return [
        None if isinstance(u, UnitsUnavailable) else UnitUse(u.count, u.count, float(v))
        for u, v in zip(units, vision, strict=True)
    ]


def record_use(record: SampleRecord, use: UnitUse | None) -> None:
    if use is not None:
        record.vision_units = use.total
        record.vision_units_encoded = use.encoded
