"""Vision units: the pieces a vision tower encodes independently (InternVL tiles and thumbnail,
LLaVA crops and base image, one Qwen-VL image), which ones a keep set needs, and whole-unit selection.

A sample's :class:`VisualUnits` says, for each of its visual tokens in position order, which unit
*owns* it (the unit its importance counts for and whose selection keeps it) and which units its
embedding *reads* (usually its owner alone; several when the model interpolates across crops; none
for a learned image-newline token). When the large model drops every unkept token before its first
decoder layer (K = 0), a unit no kept token reads never needs encoding: :func:`units_to_encode`.

:class:`UnitSkipHooks` is the seam on the vision tower: a forward pre-hook hands it only the rows
of the units to encode, a forward hook scatters the outputs back to their full-batch places (zeros
for skipped units, rows nothing reads afterwards because K = 0 pruning removes their tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from lmms_sgl.method.selection import KeepPlan, keep_count, pack_positions


class UnitsUnavailable(ValueError):
    """A sample's vision units cannot be derived (unknown processor or layout); nothing is skipped."""


@dataclass(frozen=True)
class VisualUnits:
    """One sample's vision units (all its images, in order)."""

    owner: torch.Tensor  # [N] long, the unit owning each visual token
    reads: torch.Tensor  # [N, U] bool, the units each visual token's embedding is computed from
    global_view: torch.Tensor  # [U] bool, thumbnails / base images (kept by default in selection)
    rows: tuple[int, ...]  # per unit, the rows of the vision tower's input it occupies
    flops: tuple[int, ...]  # per unit, vision tower + projector FLOPs
    image: tuple[int, ...]  # per unit, the sample's image it belongs to

    def __post_init__(self) -> None:
        units = len(self.rows)
        if self.reads.shape != (len(self.owner), units):
            raise ValueError(
                f"reads of shape {tuple(self.reads.shape)} for {len(self.owner)} tokens, {units} units"
            )
        if len(self.flops) != units or len(self.image) != units or len(self.global_view) != units:
            raise ValueError(f"{units} units, but flops/image/global_view describe a different count")
        if len(self.owner) and (int(self.owner.min()) < 0 or int(self.owner.max()) >= units):
            raise ValueError(f"owner indices outside [0, {units})")

    @property
    def count(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return len(self.owner)

    @staticmethod
    def blocks(
        tokens: list[int], global_view: list[bool], rows: list[int], flops: list[int], image: int
    ) -> VisualUnits:
        """Units whose tokens are contiguous and read only their own unit (``tokens[u]`` each)."""
        owner = torch.arange(len(tokens)).repeat_interleave(torch.tensor(tokens, dtype=torch.long))
        reads = torch.nn.functional.one_hot(owner, len(tokens)).bool()
        return VisualUnits(
            owner,
            reads,
            torch.tensor(global_view, dtype=torch.bool),
            tuple(rows),
            tuple(flops),
            (image,) * len(tokens),
        )

    @staticmethod
    def cat(parts: list[VisualUnits]) -> VisualUnits:
        """One sample's units from its images' units, in order (block-diagonal ``reads``)."""
        offsets = torch.tensor([0, *[p.count for p in parts]]).cumsum(0).tolist()
        total = offsets[-1]
        reads = torch.zeros(sum(len(p) for p in parts), total, dtype=torch.bool)
        row = 0
        for part, offset in zip(parts, offsets, strict=False):
            reads[row : row + len(part), offset : offset + part.count] = part.reads
            row += len(part)
        empty = torch.zeros(0, dtype=torch.long)
        return VisualUnits(
            torch.cat([p.owner + o for p, o in zip(parts, offsets, strict=False)]) if parts else empty,
            reads,
            torch.cat([p.global_view for p in parts]) if parts else empty.bool(),
            tuple(r for p in parts for r in p.rows),
            tuple(f for p in parts for f in p.flops),
            tuple(i for p in parts for i in p.image),
        )


def units_to_encode(units: VisualUnits, kept: torch.Tensor) -> torch.Tensor:
    """``[U]`` bool: the units at least one kept visual token reads (``kept``: ``[N]`` bool)."""
    if kept.shape != units.owner.shape:
        raise ValueError(f"kept mask of shape {tuple(kept.shape)} for {len(units)} visual tokens")
    return units.reads[kept.to(units.reads.device)].any(0)


def unit_mass(units: VisualUnits, scores: torch.Tensor) -> torch.Tensor:
    """``[U]`` float64: the importance each unit owns (sum over its tokens)."""
    if len(scores) != len(units):
        raise ValueError(f"{len(scores)} scores for {len(units)} visual tokens")
    mass = torch.zeros(units.count, dtype=torch.float64)
    return mass.index_add_(0, units.owner.cpu(), scores.detach().to("cpu", torch.float64))


def choose_units(
    units: VisualUnits, scores: torch.Tensor, keep_units: int, keep_global_view: bool
) -> torch.Tensor:
    """``[U]`` bool: the ``keep_units`` units with the largest importance mass (ties: the earlier
    unit), plus every global view when ``keep_global_view`` (they then do not compete)."""
    if keep_units < 1:
        raise ValueError(f"keep_units={keep_units} must be >= 1")
    mass = unit_mass(units, scores)
    chosen = units.global_view.clone() if keep_global_view else torch.zeros(units.count, dtype=torch.bool)
    candidates = (~chosen).nonzero().flatten().tolist()
    ranked = sorted(candidates, key=lambda u: (-float(mass[u]), u))
    chosen[ranked[:keep_units]] = True
    return chosen


def unit_keep_mask(units: VisualUnits, chosen: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: every visual token owned by a chosen unit."""
    return chosen[units.owner.cpu()]


def kept_visual_mask(index: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool over one sample's visual tokens (position order): kept by a keep-plan row
    (``index``/``valid``: its original positions; ``visual``: ``[P]`` the visual positions)."""
    kept_positions = torch.zeros_like(visual)
    kept_positions[index[valid]] = True
    return kept_positions[visual]


# -- the seam on the vision tower --------------------------------------------------------------------
def _rows_of(sizes: list[int], keep: list[bool], scale: Fraction) -> torch.Tensor:
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    picked = [
        torch.arange(int(starts[u] * scale), int(starts[u + 1] * scale)) for u, on in enumerate(keep) if on
    ]
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


def split_temporal(grids: torch.Tensor) -> torch.Tensor:
    """``[G, 3]`` ``(t, h, w)`` grids as one row ``(1, h, w)`` per temporal patch, in order."""
    rows = grids.repeat_interleave(grids[:, 0], dim=0)
    rows[:, 0] = 1
    return rows


class UnitSkipHooks:
    """Encode only some units of a vision tower's batched input and scatter the outputs back.

    ``sizes``: input rows per unit over the whole batch (InternVL / LLaVA: 1 row, a tile or crop;
    Qwen-VL: an image's patches); ``keep``: which units to encode. The input tensor is the
    ``input_name`` keyword or the first positional argument; keywords in ``per_unit`` hold one row
    per unit (Qwen-VL's ``grid_thw``) and are selected alike; with ``per_temporal_patch`` their
    ``(t, h, w)`` rows are first split into ``t`` rows ``(1, h, w)`` (a Qwen-VL video's temporal
    patches are separate units). Each output tensor (also inside tuples
    and lists) whose rows are a whole multiple of the encoded units' rows is scattered back to the
    full layout, unit by unit, with zeros for the skipped ones (Qwen-VL's merged tokens: a quarter
    of the patch rows per unit).
    """

    def __init__(
        self,
        sizes: list[int],
        keep: list[bool],
        input_name: str = "pixel_values",
        per_unit: tuple[str, ...] = (),
        per_temporal_patch: bool = False,
    ):
        if len(sizes) != len(keep):
            raise ValueError(f"{len(sizes)} unit sizes for {len(keep)} keep flags")
        if not any(keep):
            raise ValueError("unit skipping needs at least one unit to encode")
        self.sizes, self.keep = list(sizes), list(keep)
        self.input_name, self.per_unit = input_name, per_unit
        self.per_temporal_patch = per_temporal_patch
        self.calls = 0

    @property
    def encoded_rows(self) -> int:
        return sum(size for size, on in zip(self.sizes, self.keep, strict=True) if on)

    @contextmanager
    def installed(self, first: nn.Module, last: nn.Module | None = None) -> Iterator[UnitSkipHooks]:
        """Select at ``first``'s input, scatter at ``last``'s output (default ``first``): a
        projector run after the tower (InternVL, LLaVA) then also sees only the encoded units."""
        handles = [
            first.register_forward_pre_hook(self._select, with_kwargs=True),
            (last or first).register_forward_hook(self._scatter, with_kwargs=True),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _select(self, module: nn.Module, args: tuple, kwargs: dict):
        given = kwargs.get(self.input_name) if self.input_name in kwargs else args[0]
        if given.shape[0] != sum(self.sizes):
            raise RuntimeError(
                f"unit skipping: the vision tower got {given.shape[0]} rows, "
                f"the units describe {sum(self.sizes)}"
            )
        self.calls += 1
        rows = _rows_of(self.sizes, self.keep, Fraction(1)).to(given.device)
        kwargs = dict(kwargs)
        for name in self.per_unit:
            if kwargs.get(name) is not None:
                grids = split_temporal(kwargs[name]) if self.per_temporal_patch else kwargs[name]
                if len(grids) != len(self.keep):
                    raise RuntimeError(
                        f"unit skipping: {name} has {len(grids)} rows for {len(self.keep)} units"
                    )
                kwargs[name] = grids[torch.tensor(self.keep, device=grids.device)]
        if self.input_name in kwargs:
            kwargs[self.input_name] = given[rows]
            return args, kwargs
        return (given[rows], *args[1:]), kwargs

    def _scatter(self, module: nn.Module, args: tuple, kwargs: dict, output):
        encoded = self.encoded_rows

        def full(value):
            scale = (
                Fraction(value.shape[0], encoded) if isinstance(value, torch.Tensor) and value.dim() else None
            )
            if scale and all((size * scale).denominator == 1 for size in self.sizes):
                out = value.new_zeros((int(sum(self.sizes) * scale), *value.shape[1:]))
                out[_rows_of(self.sizes, self.keep, scale).to(value.device)] = value
                return out
            if isinstance(value, (tuple, list)):
                return type(value)(full(item) for item in value)
            return value

        if isinstance(output, dict):  # transformers' ModelOutput
            for key in list(output.keys()):
                output[key] = full(output[key])
            return output
        return full(output)


# -- keep plans from visual-token masks ----------------------------------------------------------------
def top_within(scores: torch.Tensor, allowed: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """``[N]`` bool: the top ``keep_count(n_allowed, keep_ratio)`` tokens by ``scores`` among the
    ``allowed`` ones (token pruning inside the chosen units; ratio 1 keeps them all)."""
    positions = allowed.nonzero().flatten()
    k = keep_count(len(positions), keep_ratio)
    kept = torch.zeros_like(allowed)
    if k:
        kept[positions[torch.topk(scores.float().cpu()[positions.cpu()], k).indices.to(positions.device)]] = (
            True
        )
    return kept


def plan_from_masks(
    masks: list[torch.Tensor | None], visual_mask: torch.Tensor, attention_mask: torch.Tensor
) -> KeepPlan:
    """A :class:`KeepPlan` keeping, per sample, the visual tokens of its
    ``[N]`` mask (``None``: all of them) and every real text token, in original order."""
    kept, kept_visual, total_visual = [], [], []
    for b in range(visual_mask.shape[0]):
        visual_positions = visual_mask[b].nonzero().flatten()
        text_positions = (attention_mask[b].bool() & ~visual_mask[b]).nonzero().flatten()
        mask = masks[b]
        if mask is not None and len(mask) != len(visual_positions):
            raise ValueError(f"sample {b}: a mask of {len(mask)} for {len(visual_positions)} visual tokens")
        chosen = visual_positions if mask is None else visual_positions[mask.to(visual_positions.device)]
        kept.append(torch.sort(torch.cat([text_positions, chosen])).values)
        kept_visual.append(len(chosen))
        total_visual.append(len(visual_positions))
    index, valid = pack_positions(kept, visual_mask.shape[1])
    return KeepPlan(index, valid, visual_mask.shape[1], tuple(kept_visual), tuple(total_visual))
