"""Unit selection with token pruning at K > 0: the chosen units' tokens from layer 0, the top
``keep_ratio`` of them from layer K (two stages).

Oracle: the unmodified large model on the full sequence (every unit encoded, nothing gathered),
with keys outside keep set 1 masked in layers < K and outside keep set 2 in layers >= K; the keep
sets computed here from the scores alone. Batch against alone; Qwen3-VL's deepstack features are
added in the first decoder layers, so K = 1 puts the second stage among them.
"""

from __future__ import annotations

import pytest
import torch

from lmms_sgl.method.pruning import format_mask, mask_kind
from lmms_sgl.method.selection import keep_count
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.units import kept_visual_mask
from lmms_sgl.pipeline import Sample
from lmms_sgl.pipeline.keep_plans import KeepPlanner
from lmms_sgl.pipeline.records import GuideScores, SampleRecord
from tests.test_units import CASES, Spy, loaded_models  # noqa: F401, F811 (the fixture)

KEEP_RATIO = 0.4
PRUNE_LAYER = 0.3  # K = 1 of the tiny models' 4 layers


def reference_sets(scores: torch.Tensor, owner: torch.Tensor, global_view: list[bool], keep_units: int):
    """Keep set 1 (tokens of the ``keep_units`` units of largest score mass, global views kept) and
    keep set 2 (the top ``keep_count`` of set 1 by score), as ``[N]`` bool masks."""
    mass = {}
    for token, unit in enumerate(owner.tolist()):
        mass[unit] = mass.get(unit, 0.0) + float(scores[token])
    candidates = [u for u in sorted(mass) if not global_view[u]]
    best = sorted(candidates, key=lambda u: (-mass[u], u))[:keep_units]
    chosen = set(best) | {u for u in mass if global_view[u]}
    first = torch.tensor([unit in chosen for unit in owner.tolist()])
    inside = first.nonzero().flatten().tolist()
    ranked = sorted(inside, key=lambda t: -float(scores[t]))[: keep_count(len(inside), KEEP_RATIO)]
    second = torch.zeros_like(first)
    second[ranked] = True
    return first, second, chosen


def planned(loaded, prompts, scores, keep_units: int):
    """Prefill logits (use_cache off) at the kept positions, 3 greedy tokens and their logits, the
    plan, records and the vision rows encoded."""
    settings = SGLSettings(
        method="sgl", prune_layer=PRUNE_LAYER, keep_ratio=KEEP_RATIO, keep_units=keep_units
    )
    planner = KeepPlanner(loaded, settings)
    samples = [Sample("t", i, p) for i, p in enumerate(prompts)]
    inputs = loaded.family.build_batch(loaded, prompts)
    visual = inputs["input_ids"] == loaded.image_token_id
    boxes = loaded.family.visual_boxes(loaded, inputs, prompts)
    guide = [GuideScores(s, b) for s, b in zip(scores, boxes, strict=True)]
    records = [SampleRecord("t", i) for i in range(len(prompts))]
    with torch.no_grad(), Spy(loaded.family.vision_tower(loaded.model)) as spy:
        with planner.pruned(samples, records, inputs, visual, guide) as pruner:
            prefill = loaded.model(**inputs, use_cache=False).logits
            plan = pruner.plan
        stages = [planner.stages(b) for b in range(len(prompts))]
        with planner.pruned(samples, records, inputs, visual, guide):
            generated = loaded.model.generate(
                **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
    slots = plan.slot_of()
    return {
        "kept": [slots[b] >= 0 for b in range(len(prompts))],
        "logits": [prefill[b, slots[b][slots[b] >= 0]] for b in range(len(prompts))],
        "tokens": generated.sequences[:, inputs["input_ids"].shape[1] :],
        "decode": torch.stack(generated.logits),
        "plan": plan,
        "visual": visual,
        "stages": stages,
        "records": records,
        "rows": spy.rows[0],
    }


def masked_reference(loaded, prompt, first: torch.Tensor, second: torch.Tensor, layer_k: int):
    """The unmodified model on one prompt, keys of dropped tokens masked per layer."""
    inputs = loaded.family.build_batch(loaded, [prompt])
    visual = (inputs["input_ids"] == loaded.image_token_id)[0]
    n = visual.shape[0]
    sets = []
    for keep in (first, second):
        keys = ~visual.clone()
        keys[visual.nonzero().flatten()[keep]] = True
        sets.append(keys)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    layers = loaded.text_model.layers

    def masker(index):
        allowed = causal & sets[int(index >= layer_k)][None, :] | torch.eye(n, dtype=torch.bool)

        def hook(module, args, kwargs):
            mask = format_mask(allowed[None, None], mask_kind(module), torch.float32)
            return args, {**kwargs, "attention_mask": mask}

        return hook

    handles = [layer.register_forward_pre_hook(masker(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = loaded.model(**inputs, use_cache=False).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits[sets[1]]


@pytest.mark.parametrize("case,keep_units", [("internvl", 1), ("llava_ov", 1), ("qwen3_vl", 1)])
def test_units_from_layer_0_and_tokens_from_k_equal_a_masked_reference(
    case,
    keep_units,
    loaded_models,  # noqa: F811
):
    loaded = loaded_models(case)
    prompts = CASES[case][2]
    layer_k = int(loaded.num_layers * PRUNE_LAYER)
    assert layer_k >= 1
    inputs = loaded.family.build_batch(loaded, prompts)
    counts = (inputs["input_ids"] == loaded.image_token_id).sum(1).tolist()
    units = loaded.family.visual_units(loaded, inputs, prompts)
    scores = [torch.rand(n, generator=torch.Generator().manual_seed(11 + n)) for n in counts]
    together = planned(loaded, prompts, scores, keep_units)
    encoded_rows = 0
    for b, prompt in enumerate(prompts):
        globals_ = units[b].global_view.tolist()
        first, second, chosen = reference_sets(scores[b], units[b].owner, globals_, keep_units)
        assert len(chosen) < units[b].count, "the case must drop a unit"
        encoded_rows += sum(rows for u, rows in enumerate(units[b].rows) if u in chosen)
        plan = together["plan"]
        assert torch.equal(kept_visual_mask(plan.index[b], plan.valid[b], together["visual"][b]), second)
        assert together["stages"][b] == [(0, int(first.sum())), (layer_k, int(second.sum()))]
        assert together["records"][b].extra["units_kept"] == len(chosen)
        expected = masked_reference(loaded, prompt, first, second, layer_k)
        torch.testing.assert_close(together["logits"][b], expected, rtol=0, atol=1e-5)

        alone = planned(loaded, [prompt], [scores[b]], keep_units)
        torch.testing.assert_close(alone["logits"][0], expected, rtol=0, atol=1e-5)
        assert torch.equal(alone["tokens"][0], together["tokens"][b])
        torch.testing.assert_close(alone["decode"][:, 0], together["decode"][:, b], rtol=0, atol=1e-4)
    assert together["rows"] == encoded_rows  # only the chosen units were encoded


def test_keep_units_with_k_and_presets_parse():
    from lmms_sgl.lmms.args import parse_model_args

    args = parse_model_args(
        pretrained="big", guide="small", keep_units="2", prune_layer="0.2", keep_ratio="0.5"
    )
    assert (args.settings.keep_units, args.settings.prune_layer, args.settings.keep_ratio) == (2, 0.2, 0.5)
    preset = parse_model_args(pretrained="big", guide="small", keep_units="3", token_ratio="0.35")
    assert (preset.settings.prune_layer, preset.settings.keep_ratio) == (0.2, 0.2)
