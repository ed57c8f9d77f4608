"""Guidance across resolutions: the guide's importance mapped onto the large model's visual tokens
by image geometry, so a cheaply tiled guide can steer a finely tiled large model.

Each visual token of a sample is described by :class:`TokenBoxes`: the image it belongs to, the
*view* (tile set) it is part of within that image (InternVL: the tile grid = 0, the thumbnail = 1;
LLaVA any-res: the base image = 0, the crop grid = 1), and the box ``(x0, y0, x1, y1)`` of the
original image it covers, in original pixels. The area tokens of one view cover their image
exactly once. Image-newline tokens cover no area (``newline`` is True); their ``boxes`` entry holds
the row band they close, used only to map newline to newline.

Mapping (area-weighted overlap). For a large token j of image i in view L, the guide view v of the
same image whose mean token area is closest to L's (smallest ``|log(area_L / area_v)|``; ties: the
same view id, then the lower one) supplies the scores:

    s_j = sum_{g in v, same kind as j}  a_g * |B_j  intersect  G_g| / |G_g|

with ``a_g`` the guide's importance of token g, ``B_j`` and ``G_g`` their boxes and ``|.|`` the
area (a guide token of zero area contributes nothing). It spreads each guide token's attention mass
uniformly over its box and gives every large token the mass that falls in its own box, so a view's
total mass is conserved and a token seen twice (tile and thumbnail) gets the mapped score of each of
its boxes separately. A newline token whose matched guide view has no newline tokens gets the mean
mapped score of the area tokens of its row.

Identical layouts give the identity exactly: each view matches its twin, each large box equals one
guide box (ratio exactly 1.0) and overlaps the others by zero area (edges are computed by one
expression for both neighbours, so adjacent boxes share their edge bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class BoxesUnavailable(ValueError):
    """The boxes of a sample's visual tokens cannot be derived (unknown processor setting, a token
    count that does not match the derived layout, ...); the message says why."""


@dataclass(frozen=True)
class TokenBoxes:
    """Geometry of one sample's visual tokens, in position order."""

    boxes: torch.Tensor  # [N, 4] float64, (x0, y0, x1, y1) in original-image pixels
    image: torch.Tensor  # [N] long, index of the sample's image the token belongs to
    view: torch.Tensor  # [N] long, tile set within that image
    newline: torch.Tensor  # [N] bool, image-newline tokens (cover no area)
    layout: tuple[str, ...] = ()  # per image, human-readable (the samples log records it)

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @staticmethod
    def grid(
        x_edges: torch.Tensor, y_edges: torch.Tensor, image: int, view: int, layout: str = ""
    ) -> TokenBoxes:
        """Row-major cells of the grid with these edges (``[C + 1]`` and ``[R + 1]``)."""
        rows, cols = len(y_edges) - 1, len(x_edges) - 1
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        boxes = torch.stack([x_edges[xs], y_edges[ys], x_edges[xs + 1], y_edges[ys + 1]], dim=1)
        return TokenBoxes.of(boxes, image, view, layout=layout)

    @staticmethod
    def of(boxes: torch.Tensor, image: int, view: int, newline: bool = False, layout: str = "") -> TokenBoxes:
        n = boxes.shape[0]
        return TokenBoxes(
            boxes.to(torch.float64).reshape(n, 4),
            torch.full((n,), image, dtype=torch.long),
            torch.full((n,), view, dtype=torch.long),
            torch.full((n,), newline, dtype=torch.bool),
            (layout,) if layout else (),
        )

    @staticmethod
    def cat(parts: list[TokenBoxes]) -> TokenBoxes:
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            return TokenBoxes(torch.zeros(0, 4, dtype=torch.float64), empty, empty, empty.bool())
        return TokenBoxes(
            torch.cat([p.boxes for p in parts]),
            torch.cat([p.image for p in parts]),
            torch.cat([p.view for p in parts]),
            torch.cat([p.newline for p in parts]),
            tuple(name for p in parts for name in p.layout),
        )

    def shifted(self, image_offset: int) -> TokenBoxes:
        return TokenBoxes(self.boxes, self.image + image_offset, self.view, self.newline, self.layout)

    def areas(self) -> torch.Tensor:
        """Area each token covers (0 for newline tokens and for cells outside the image)."""
        width = (self.boxes[:, 2] - self.boxes[:, 0]).clamp(min=0)
        height = (self.boxes[:, 3] - self.boxes[:, 1]).clamp(min=0)
        return torch.where(self.newline, torch.zeros_like(width), width * height)

    def same_layout(self, other: TokenBoxes) -> bool:
        return (
            len(self) == len(other)
            and torch.equal(self.boxes, other.boxes)
            and torch.equal(self.image, other.image)
            and torch.equal(self.view, other.view)
            and torch.equal(self.newline, other.newline)
        )


def even_edges(start: float, stop: float, cells: int) -> torch.Tensor:
    """``cells + 1`` edges splitting ``[start, stop]`` evenly (one expression per edge)."""
    k = torch.arange(cells + 1, dtype=torch.float64)
    return start + k * (stop - start) / cells


def overlap(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` intersection areas of two box lists."""
    x0 = torch.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    y0 = torch.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    x1 = torch.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    y1 = torch.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    return (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _spread(scores: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each source score spread uniformly over its box, integrated over each target box."""
    area = _box_area(source)
    weights = overlap(target, source) / torch.where(area > 0, area, torch.ones_like(area))
    weights = torch.where(area[None, :] > 0, weights, torch.zeros_like(weights))
    return weights @ scores


def _matching_view(large_view: int, large_area: float, guide_views: dict[int, float]) -> int:
    def distance(view: int) -> tuple[float, int, int]:
        area = guide_views[view]
        gap = math.inf if area <= 0 or large_area <= 0 else abs(math.log(large_area / area))
        return (gap, abs(view - large_view), view)

    return min(guide_views, key=distance)


def transfer_importance(scores: torch.Tensor, guide: TokenBoxes, large: TokenBoxes) -> torch.Tensor:
    """The guide's per-token ``scores`` mapped onto the large model's tokens (see the module doc).

    Returns one score per large token, in the dtype of ``scores``. Raises :class:`BoxesUnavailable`
    when the large model has an image the guide did not see.
    """
    if len(scores) != len(guide):
        raise BoxesUnavailable(f"{len(scores)} guide scores for {len(guide)} guide token boxes")
    values = scores.detach().to("cpu", torch.float64)
    out = torch.zeros(len(large), dtype=torch.float64)
    guide_areas, large_areas = guide.areas(), large.areas()
    for image in large.image.unique().tolist():
        in_guide = guide.image == image
        guide_views = {
            view: float(guide_areas[in_guide & (guide.view == view) & ~guide.newline].mean())
            for view in guide.view[in_guide & ~guide.newline].unique().tolist()
        }
        if not guide_views:
            raise BoxesUnavailable(f"image {image}: the guide has no visual tokens for it")
        for view in large.view[large.image == image].unique().tolist():
            members = (large.image == image) & (large.view == view)
            area_tokens = members & ~large.newline
            mean_area = float(large_areas[area_tokens].mean()) if area_tokens.any() else 0.0
            source_view = _matching_view(view, mean_area, guide_views)
            source = in_guide & (guide.view == source_view)
            source_area = source & ~guide.newline
            out[area_tokens] = _spread(
                values[source_area], guide.boxes[source_area], large.boxes[area_tokens]
            )
            newlines = members & large.newline
            if not newlines.any():
                continue
            source_newlines = source & guide.newline
            if source_newlines.any():
                out[newlines] = _spread(
                    values[source_newlines], guide.boxes[source_newlines], large.boxes[newlines]
                )
            else:  # mean of the row each newline closes
                rows = overlap(large.boxes[newlines], large.boxes[area_tokens]) > 0
                counts = rows.sum(1).clamp(min=1)
                out[newlines] = (rows.to(torch.float64) @ out[area_tokens]) / counts
    return out.to(scores.dtype)


def layout_text(boxes: TokenBoxes | BoxesUnavailable) -> str:
    """What the samples log records of a layout: its tiles per image, or why it is unknown."""
    if isinstance(boxes, BoxesUnavailable):
        return f"unknown: {boxes}"
    return "; ".join(boxes.layout)
