"""Oracle tests for pruning at decoder layer K (VisualTokenPruner)."""

from __future__ import annotations

import pytest
import torch

from lmms_sgl.method.pruning import VisualTokenPruner, format_mask, mask_kind
from lmms_sgl.method.selection import plan_from_scores, random_scores
from tests.helpers import batch, greedy, load

FAMILIES = ["internvl", "llava"]


@pytest.fixture(scope="module", params=[(f, a) for f in FAMILIES for a in ("sdpa", "eager")], ids=str)
def large(request, models_dir):
    family, attn = request.param
    model, processor = load(models_dir / f"{family}-large", attn)
    return model, processor


def visual(model, inputs):
    return inputs.input_ids == model.config.image_token_id


def test_keep_all_is_identical_to_unpruned(large):
    model, processor = large
    inputs = batch(processor)
    base = greedy(model, inputs, output_logits=True, return_dict_in_generate=True)
    pruner = VisualTokenPruner(model.model.language_model, 2)
    with pruner.installed():
        pruner.arm(plan_from_scores([None, None], visual(model, inputs), inputs.attention_mask, 1.0))
        same = greedy(model, inputs, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(same.sequences, base.sequences)
    for a, b in zip(same.logits, base.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_pruning_changes_the_output(large):
    """Guards the other oracles against a pruner that silently does nothing."""
    model, processor = large
    inputs = batch(processor, (0,))
    base = model(**inputs).logits[:, -1]
    pruner = VisualTokenPruner(model.model.language_model, 1)
    with pruner.installed():
        pruner.arm(
            plan_from_scores(
                random_scores(visual(model, inputs), 0), visual(model, inputs), inputs.attention_mask, 0.1
            )
        )
        pruned = model(**inputs).logits[:, -1]
    assert (pruned - base).abs().max() > 1e-3


def merged_embeddings(model, inputs):
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("embeds", kwargs["inputs_embeds"])

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured["embeds"]


def test_k0_equals_running_on_the_dropped_sequence(large):
    model, processor = large
    inputs = batch(processor, (0,))
    vis = visual(model, inputs)
    plan = plan_from_scores(random_scores(vis, 3), vis, inputs.attention_mask, 0.2)
    pruner = VisualTokenPruner(model.model.language_model, 0)
    with pruner.installed():
        pruner.arm(plan)
        pruned = model(**inputs).logits
    keep = plan.index[0]
    embeds = merged_embeddings(model, inputs)[:, keep]
    hidden = model.model.language_model(inputs_embeds=embeds, position_ids=keep[None]).last_hidden_state
    reference = model.lm_head(hidden)
    torch.testing.assert_close(pruned, reference, rtol=0, atol=2e-5)


def test_k_gt_0_equals_masking_dropped_keys_from_layer_k(large):
    """Reference: no gathering at all, the full sequence with dropped keys masked in layers >= K."""
    model, processor = large
    inputs = batch(processor, (0,))
    vis = visual(model, inputs)
    k = 2
    plan = plan_from_scores(random_scores(vis, 4), vis, inputs.attention_mask, 0.3)
    pruner = VisualTokenPruner(model.model.language_model, k)
    with pruner.installed():
        pruner.arm(plan)
        pruned = model(**inputs).logits[0]

    n = inputs.input_ids.shape[1]
    kept = torch.zeros(n, dtype=torch.bool)
    kept[plan.index[0]] = True
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & kept[None, :]
    allowed |= torch.eye(n, dtype=torch.bool)
    layers = model.model.language_model.layers

    def masker(module, args, kwargs):
        kind = mask_kind(module)
        return args, {**kwargs, "attention_mask": format_mask(allowed[None, None], kind, torch.float32)}

    handles = [layers[i].register_forward_pre_hook(masker, with_kwargs=True) for i in range(k, len(layers))]
    try:
        full = model(**inputs).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(pruned, full[plan.index[0]], rtol=0, atol=2e-5)


def test_cached_pruned_decoding_equals_a_no_cache_forward(large):
    model, processor = large
    inputs = batch(processor, (0,))
    vis = visual(model, inputs)
    scores = random_scores(vis, 5)
    pruner = VisualTokenPruner(model.model.language_model, 2)
    steps = 5
    with pruner.installed():
        pruner.arm(plan_from_scores(scores, vis, inputs.attention_mask, 0.25))
        out = greedy(model, inputs, steps, output_logits=True, return_dict_in_generate=True)
        sequence = out.sequences[:, :-1]  # prompt + all generated tokens but the last
        pad = sequence.shape[1] - vis.shape[1]
        full_vis = torch.cat([vis, torch.zeros(1, pad, dtype=torch.bool)], dim=1)
        mask = torch.ones_like(sequence)
        pruner.arm(plan_from_scores(scores, full_vis, mask, 0.25))
        logits = model(
            input_ids=sequence, attention_mask=mask, pixel_values=inputs.pixel_values, use_cache=False
        ).logits
    for step in range(steps):
        # the logits of generated token `step` are read at the position just before it
        torch.testing.assert_close(out.logits[step][0], logits[0, -steps + step], rtol=0, atol=5e-5)


@pytest.mark.parametrize("k", [0, 2])
def test_each_batched_sample_matches_its_solo_run(large, k):
    model, processor = large
    inputs = batch(processor, (0, 1, 2))
    vis = visual(model, inputs)
    scores = random_scores(vis, 7)
    ratios = 0.2
    pruner = VisualTokenPruner(model.model.language_model, k)
    with pruner.installed():
        pruner.arm(plan_from_scores(scores, vis, inputs.attention_mask, ratios))
        together = greedy(model, inputs, output_logits=True, return_dict_in_generate=True)
        assert not bool(pruner.plan.valid.all()), "the batch should exercise re-padding after pruning"
        for b in range(3):
            solo_inputs = batch(processor, (b,))
            pruner.arm(
                plan_from_scores([scores[b]], visual(model, solo_inputs), solo_inputs.attention_mask, ratios)
            )
            solo = greedy(model, solo_inputs, output_logits=True, return_dict_in_generate=True)
            p_batch, p_solo = inputs.input_ids.shape[1], solo_inputs.input_ids.shape[1]
            assert torch.equal(together.sequences[b, p_batch:], solo.sequences[0, p_solo:])
            for a, c in zip(together.logits, solo.logits, strict=True):
                torch.testing.assert_close(a[b], c[0], rtol=0, atol=1e-4)


def test_rejects_flash_attention_and_bad_layer(models_dir):
    model, _ = load(models_dir / "llava-guide")
    with pytest.raises(ValueError, match=r"layer_k=7 is outside \[0, 2\)"):
        VisualTokenPruner(model.model.language_model, 7)
    model.model.language_model.layers[0].self_attn.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        mask_kind(model.model.language_model.layers[0])
