"""Dense per-token supervision derived from a scene: what each visual token shows, and which tokens
hold a question's evidence. Token order is row-major, as both families hand tokens to the text model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lmms_sgl.proving.palette import COLORS
from lmms_sgl.proving.shapes import SHAPES, SIZES, Scene, SceneObject, evidence

GRID = 16  # visual tokens per side for a 448 px image, both families (256 tokens)
COLOR_NAMES = sorted(COLORS)
SIZE_NAMES = sorted(SIZES)


def object_cells(obj: SceneObject, width: int, height: int, grid: int = GRID) -> list[int]:
    """Row-major indices of the visual tokens whose centre lies inside the object's box."""
    left, top, right, bottom = obj.box
    cell_w, cell_h = width / grid, height / grid
    return [
        row * grid + col
        for row in range(grid)
        if top <= (row + 0.5) * cell_h < bottom
        for col in range(grid)
        if left <= (col + 0.5) * cell_w < right
    ]


def dense_targets(scene: Scene, grid: int = GRID) -> torch.Tensor:
    """``(4, grid * grid)`` long targets per visual token, row-major like the models' token order:
    colour, shape and size of the object covering the token centre (0 = background, else index + 1)
    and 1 where an object's centre falls in the token (so that objects can be counted)."""
    targets = torch.zeros(4, grid * grid, dtype=torch.long)
    cell_w, cell_h = scene.width / grid, scene.height / grid
    for obj in scene.objects:
        cells = object_cells(obj, scene.width, scene.height, grid)
        targets[0, cells] = COLOR_NAMES.index(obj.color) + 1
        targets[1, cells] = SHAPES.index(obj.shape) + 1
        targets[2, cells] = SIZE_NAMES.index(obj.size) + 1
        left, top, right, bottom = obj.box
        center_row = min(grid - 1, int((top + bottom) / 2 / cell_h))
        center_col = min(grid - 1, int((left + right) / 2 / cell_w))
        targets[3, center_row * grid + center_col] = 1
    return targets


def objects_mask(scene: Scene, objects: Iterable[SceneObject], grid: int = GRID) -> torch.Tensor:
    """``(grid * grid,)`` bool: the visual tokens of ``objects`` (some of the scene's)."""
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    for obj in objects:
        mask[object_cells(obj, scene.width, scene.height, grid)] = True
    return mask


def evidence_mask(scene: Scene, question: str, grid: int = GRID) -> torch.Tensor:
    """``(grid * grid,)`` bool: the visual tokens of the objects the question is about."""
    return objects_mask(scene, evidence(scene, question), grid)


class DenseHeads(nn.Module):
    """Linear read-outs of the visual tokens used only while pretraining the vision side."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Linear(hidden, n) for n in (len(COLOR_NAMES) + 1, len(SHAPES) + 1, len(SIZE_NAMES) + 1, 2)
        )

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy summed over heads; object tokens weigh 4x so the background does not dominate.
        Returns the loss and the token accuracy of the shape head on object tokens."""
        on_object = targets[:, 0] > 0
        weight = 1.0 + 3.0 * on_object.float()
        total = tokens.new_zeros(())
        for i, head in enumerate(self.heads):
            logits = head(tokens)
            ce = F.cross_entropy(logits.flatten(0, 1), targets[:, i].flatten(), reduction="none")
            total = total + (ce * weight.flatten()).sum() / weight.sum()
            if i == 1:
                hits = (logits.argmax(-1) == targets[:, 1])[on_object]
                shape_accuracy = hits.float().mean().item() if hits.numel() else 0.0
        return total, shape_accuracy
