"""FastV baseline through the same machinery: the large model ranks visual tokens by its *own*
attention from the last prompt token at layer K-1, then prunes at layer K (FastV, ECCV 2024).

Only the single last prompt row of one layer is recorded (through the recording attention), and
the keep plan is computed lazily when layer K starts, in the same prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace

import torch

from lmms_sgl.method import cost
from lmms_sgl.method.importance import AttentionRecorder, last_prompt_row, visual_scores
from lmms_sgl.method.registry import (
    AFTER_FIRST,
    KeepMethod,
    MethodRun,
    PlanBatch,
    register,
    single_stage_reader,
)
from lmms_sgl.method.selection import KeepPlan, plan_from_scores


def fastv_recorder(
    attention_mask: torch.Tensor, layer_k: int, query_rows: torch.Tensor | None = None
) -> AttentionRecorder:
    """Records layer K-1's attention from ``query_rows`` (default: each sample's last prompt token;
    for log-likelihood, the last context token before the continuation)."""
    if layer_k < 1:
        raise ValueError(f"FastV ranks tokens at layer K-1, so it needs K >= 1; got K={layer_k}")
    rows = last_prompt_row(attention_mask) if query_rows is None else query_rows
    return AttentionRecorder(rows, layers=frozenset({layer_k - 1}), record_decode=False)


def fastv_plan_source(
    recorder: AttentionRecorder, visual_mask: torch.Tensor, attention_mask: torch.Tensor, keep_ratio: float
) -> Callable[[], KeepPlan]:
    def plan() -> KeepPlan:
        scores = visual_scores(recorder.prefill, visual_mask.to(recorder.prefill.device))
        return plan_from_scores(scores, visual_mask, attention_mask, keep_ratio)

    return plan


@register
class FastV(KeepMethod):
    name = "fastv"
    own_attention = True
    layers = AFTER_FIRST

    def arm(self, batch: PlanBatch, stack: ExitStack) -> MethodRun:
        recorder = fastv_recorder(batch.attention_mask, batch.layer_k, batch.query_rows)
        source = fastv_plan_source(recorder, batch.visual, batch.attention_mask, batch.settings.keep_ratio)
        stack.enter_context(recorder.active())
        stack.enter_context(batch.pruner.installed())
        batch.pruner.arm(source)
        shape = batch.large.text_shape

        def selection_flops(sample: int, prompt: int, n_visual: int, stages) -> float:
            return self.planned_selection_flops(shape, prompt, n_visual, stages)

        return MethodRun(single_stage_reader(batch), selection_flops=selection_flops)

    def planned_selection_flops(self, shape, prompt: int, n_visual: int, stages) -> float:
        """The recorded row: one query over the prompt's keys in layer K-1."""
        return cost.recording_flops(replace(shape, num_layers=1), 1, 1, 0) * prompt
