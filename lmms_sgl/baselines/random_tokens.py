"""The ``random`` baseline: every visual token gets a seeded random score (per sample key, so a
sample keeps the same tokens alone and in a batch), the top ``keep_ratio`` are kept from layer K on."""

from __future__ import annotations

import torch

from lmms_sgl.method.registry import PlanBatch, ScoredMethod, register
from lmms_sgl.method.selection import random_scores


@register
class RandomTokens(ScoredMethod):
    name = "random"

    def token_scores(self, batch: PlanBatch) -> list[torch.Tensor | None]:
        keys = [sample.key for sample in batch.samples]
        return random_scores(batch.visual.cpu(), batch.settings.seed, keys)
