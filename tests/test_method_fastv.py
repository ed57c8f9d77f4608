"""FastV through the shared machinery equals a ranking read from eager output_attentions."""

from __future__ import annotations

import pytest
import torch

from lmms_sgl.baselines.fastv import fastv_plan_source, fastv_recorder
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores
from tests.helpers import batch, greedy, load


@pytest.mark.parametrize("family", ["internvl", "llava"])
def test_fastv_keeps_the_tokens_ranked_by_layer_k_minus_1_last_row(models_dir, family):
    path = models_dir / f"{family}-large"
    model, processor = load(path, {"text_config": ATTENTION_NAME, "vision_config": "sdpa"})
    eager, _ = load(path, "eager")
    inputs = batch(processor, (0, 1))
    vis = inputs.input_ids == model.config.image_token_id
    k, ratio = 2, 0.25

    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    last_row = attentions[k - 1][:, :, -1, :].sum(1)  # [B, P]: heads summed, last prompt token
    expected = plan_from_scores([last_row[b][vis[b]] for b in range(2)], vis, inputs.attention_mask, ratio)

    recorder = fastv_recorder(inputs.attention_mask, k)
    pruner = VisualTokenPruner(model.model.language_model, k)
    with pruner.installed(), recorder.active():
        pruner.arm(fastv_plan_source(recorder, vis, inputs.attention_mask, ratio))
        out = greedy(model, inputs, 4)
        plan = pruner.plan
    assert torch.equal(plan.index, expected.index) and torch.equal(plan.valid, expected.valid)

    with pruner.installed():  # the same keep set given up front generates the same tokens
        pruner.arm(expected)
        assert torch.equal(greedy(model, inputs, 4), out)
