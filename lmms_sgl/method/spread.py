"""Guided spread selection: the guide's most important tokens, spread over the image.

Top-k by the guide's importance (the paper's rule) keeps clusters: at 9 % of the tokens whole
budgets go to a few neighbouring patches of the most salient object, and questions that need
coverage (counting, "is there a ...") lose. ``selection=spread`` keeps the most important token,
excludes its neighbours within ``radius`` cells, and repeats (non-maximum suppression of the
importance on the large model's token grid). When the budget cannot be filled that way, the radius
shrinks by one and the tokens left are visited again in order of importance, down to radius 0,
which is top-k: so ``radius=0`` *is* the paper's rule, and the budget is always filled.

Geometry comes from :class:`~lmms_sgl.method.transfer.TokenBoxes` (each token's box in the original
image), so one rule serves every layout:

* two tokens are neighbours within ``radius`` when they belong to the same image and the same view
  and, along each axis, at most ``radius`` cells apart (:func:`neighbours`; on a regular grid: the
  8 cells around a token at radius 1, the 24 at radius 2); tiles of one view share the image's frame, so
  neighbourhoods cross tile borders (InternVL tiles, LLaVA-NeXT / OneVision crops after
  unpadding), and Qwen-VL's merged patches of any size are cells like any other;
* a thumbnail or base image is its own view, hence its own grid: it neither suppresses nor is
  suppressed by the tiles, which see the same area at another scale;
* newline tokens cover no area and have no neighbours; several images of a request never
  neighbour each other.

The rule compares boxes and scores only: no matrix product, so it adds no counted FLOPs.
"""

from __future__ import annotations

import torch

from lmms_sgl.method.transfer import TokenBoxes

SELECTIONS = ("auto", "topk", "spread")
# ``selection=auto`` (the default) spreads when the large model prunes from layer 0 (no layer has seen
# the dropped tokens, so what is kept must cover the image) or keeps at most this share of its visual
# tokens, and uses top-k otherwise; spreading uses ``DEFAULT_RADIUS``. Both chosen on the validation
# split (``python -m lmms_sgl.proving.spread``, reports/spread.md): from layer 0 spreading gains up
# to 25 points and never loses; from layer 1 on top-k is level or better.
AUTO_SPREAD_MAX_KEEP = 0.1
DEFAULT_RADIUS = 2


def resolve_selection(selection: str, keep_ratio: float, layer_k: int) -> str:
    """``topk`` or ``spread``: the rule ``selection`` means at ``keep_ratio`` from layer ``layer_k``."""
    if selection != "auto":
        return selection
    return "spread" if layer_k == 0 or keep_ratio <= AUTO_SPREAD_MAX_KEEP else "topk"


def neighbours(boxes: TokenBoxes, token: int, radius: int) -> torch.Tensor:
    """``[N]`` bool: the tokens within ``radius`` cells of ``token`` (itself included): same image,
    same view, and along each axis a gap between the two boxes of less than ``radius - 1/2`` of the
    narrower one's extent (``k`` cells apart on a grid leave a gap of ``k - 1`` cells, so this is
    ``k <= radius``, with half a cell of margin for the one-pixel unevenness of resized grids)."""
    box, others = boxes.boxes[token], boxes.boxes
    near = (boxes.image == boxes.image[token]) & (boxes.view == boxes.view[token]) & ~boxes.newline
    for low, high in ((0, 2), (1, 3)):
        gap = (torch.maximum(others[:, low], box[low]) - torch.minimum(others[:, high], box[high])).clamp(
            min=0
        )
        extent = torch.minimum(others[:, high] - others[:, low], box[high] - box[low])
        near &= gap < (radius - 0.5) * extent
    if bool(boxes.newline[token]):
        near = torch.zeros_like(near)
    near[token] = True
    return near


def spread_select(
    scores: torch.Tensor,
    boxes: TokenBoxes,
    count: int,
    radius: int,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (sorted) of ``count`` tokens among the ``allowed`` ones (default all): greedy
    non-maximum suppression of ``scores`` with neighbourhoods of ``radius`` cells, the radius
    shrinking by one whenever no token is left to take; radius 0 is top-k. Ties go to the lower
    index."""
    n = len(scores)
    if len(boxes) != n:
        raise ValueError(f"{n} scores for {len(boxes)} token boxes")
    allowed = torch.ones(n, dtype=torch.bool) if allowed is None else allowed.bool().cpu()
    candidates = allowed.nonzero().flatten()
    if not 0 <= count <= len(candidates):
        raise ValueError(f"cannot keep {count} of {len(candidates)} tokens")
    if radius < 0:
        raise ValueError(f"radius={radius} must be >= 0")
    values = scores.float().cpu()
    if radius == 0 or count == len(candidates):
        return torch.sort(candidates[torch.topk(values[candidates], count).indices]).values
    order = candidates[torch.sort(values[candidates], descending=True, stable=True).indices].tolist()
    taken = torch.zeros(n, dtype=torch.bool)
    chosen = 0
    for current in range(radius, 0, -1):
        blocked = taken.clone()
        for token in taken.nonzero().flatten().tolist():  # what is kept already suppresses at this radius
            blocked |= neighbours(boxes, token, current)
        for token in order:
            if chosen == count:
                break
            if blocked[token]:
                continue
            taken[token] = True
            chosen += 1
            blocked |= neighbours(boxes, token, current)
        if chosen == count:
            return taken.nonzero().flatten()
    rest = [token for token in order if not taken[token]][: count - chosen]  # radius 0: top-k of the rest
    taken[rest] = True
    return taken.nonzero().flatten()
