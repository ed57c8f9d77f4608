"""Answers as real tasks need them (issue 10): no cut at lmms-eval's injected "\\n\\n", the official
keep count, ``min_new_tokens=1`` for the large model, and the official bf16 arithmetic on request."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmms_sgl.factory import build as factory
from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt
from lmms_sgl.method.guide import run_guide
from lmms_sgl.method.importance import ATTENTION_NAME, EAGER_ATTENTION_NAME, prompt_rows_from_last_visual
from lmms_sgl.method.selection import keep_count, plan_from_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline
from tests.helpers import batch, evaluate, load, raw_response

LONG_ANSWER = "red\n\nblue green."
FAMILIES = {"internvl": InternVLFamily, "llava": LlavaFamily}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """Factory checkpoints whose greedy answer is LONG_ANSWER (a blank line inside)."""
    out = tmp_path_factory.mktemp("scripted")
    names = ("internvl-large", "internvl-guide", "llava-large")
    return {name: factory.save_scripted(name, LONG_ANSWER, out) for name in names}


def test_injected_default_stop_is_dropped_explicit_ones_kept():
    assert GenerationSettings.from_gen_kwargs({"until": ["\n\n"]}).until == ()
    assert GenerationSettings.from_gen_kwargs({"until": "\n\n"}).until == ()
    assert GenerationSettings.from_gen_kwargs({"until": ["\n\n", "ASSISTANT:", "\n"]}).until == (
        "ASSISTANT:",
        "\n",
    )


def test_large_model_generates_at_least_one_token():
    assert GenerationSettings().large_kwargs()["min_new_tokens"] == 1


@pytest.mark.parametrize(
    "n,ratio,expected", [(2880, 0.35, 1007), (256, 0.2, 51), (3, 0.05, 1), (1792, 0.05, 89), (10, 1.0, 10)]
)
def test_keep_count_is_the_official_floor(n, ratio, expected):
    assert keep_count(n, ratio) == expected == max(1, int(n * ratio))


def test_scripted_answer_with_blank_line_comes_back_whole(scripted):
    """Guide and large model stop at EOS, not at "\\n\\n"; the guide records its whole answer."""
    family = InternVLFamily(max_tiles=2)
    load_args = {"dtype": torch.float32, "device_map": "cpu"}
    guide = family.load(str(scripted["internvl-guide"]), text_attention=ATTENTION_NAME, **load_args)
    large = family.load(str(scripted["internvl-large"]), text_attention="sdpa", **load_args)
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 24, "until": ["\n\n"]})
    sample = Sample("t", 0, Prompt("What color is it?", [Image.new("RGB", (600, 400), (200, 10, 10))]))
    pipeline = SGLPipeline(large, guide, SGLSettings(prune_layer=0.5, keep_ratio=0.2))
    record = pipeline.generate([sample], gen)[0]
    assert record.guide_answer == LONG_ANSWER and record.answer == LONG_ANSWER
    assert record.fallback is None and record.reached_large

    inputs = family.build_batch(guide, [sample.prompt])
    visual = inputs["input_ids"] == guide.image_token_id
    run = run_guide(guide.model, guide.text_model, inputs, visual, 24, guide.stop_token_ids, guide.tokenizer)
    answer_tokens = len(guide.tokenizer(LONG_ANSWER, add_special_tokens=False).input_ids) + 1  # + EOS
    assert run.lengths.tolist() == [answer_tokens]
    eager, _ = load(scripted["internvl-guide"], "eager")
    rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"]).float()
    out = eager.generate(
        **inputs, max_new_tokens=24, do_sample=False, output_attentions=True, return_dict_in_generate=True
    )
    prompt_length = inputs["input_ids"].shape[1]
    expected = torch.zeros(prompt_length)
    for step, layers in enumerate(out.attentions[:answer_tokens]):  # prefill + every fed-back token
        for attention in layers:
            if step == 0:
                expected += torch.einsum("hqk,q->k", attention[0, ..., :prompt_length], rows[0])
            else:
                expected += attention[0, :, 0, :prompt_length].sum(0)
    torch.testing.assert_close(run.importance[0], expected[visual[0]], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "host,model,family", [("internvl_hf", "sgl_internvl2", "internvl"), ("llava_hf", "sgl_llava", "llava")]
)
def test_long_answers_equal_lmms_eval_models_uncut(scripted, tasks_dir, host, model, family):
    """lmms-eval's own models and ours, large model only, on a task with no ``until`` of its own."""
    large = scripted[f"{family}-large"]
    theirs = evaluate(host, f"pretrained={large},device=cpu,device_map=cpu", "sgl_longform", tasks_dir, 2)
    tiles = ",max_tiles=12" if family == "internvl" else ""  # only InternVL tiles
    ours = evaluate(model, f"pretrained={large},method=large_only{tiles}", "sgl_longform", tasks_dir, 2)
    expected = [raw_response(row) for row in theirs["samples"]["sgl_longform"]]
    got = [raw_response(row) for row in ours["samples"]["sgl_longform"]]
    assert got == expected == [LONG_ANSWER] * 2


def official_bf16_importance(model, inputs, visual, steps):
    """The official arithmetic from transformers' eager ``output_attentions`` (batch of one), and the
    one-running-total reading it is not.

    Official order: within each forward (the prefill, then each fed-back token) the bf16 slices
    [rows from the last visual token, visual span] of every layer, summed over batch, heads and
    rows, are added to a per-forward total that starts at 0; the per-forward totals are then added
    up across the forwards. The other reading adds every layer of every forward to one total.
    """
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=1,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
    )
    positions = visual[0].nonzero().flatten()
    first, last = int(positions[0]), int(positions[-1]) + 1
    total = running = 0
    for step, layers in enumerate(out.attentions[:steps]):  # the last token is never fed back
        forward = 0
        for attention in layers:
            rows = attention[:, :, last - 1 :] if step == 0 else attention
            layer = rows[..., first:last].sum(dim=(0, 1, 2))
            forward = forward + layer
            running = running + layer
        total = total + forward
    return total, running


@pytest.mark.parametrize("family", ["internvl", "llava"])
def test_model_precision_reproduces_official_bf16_rankings(models_dir, family):
    path = models_dir / f"{family}-guide"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def bf16(attention):
        return AutoModelForImageTextToText.from_pretrained(
            path,
            dtype=torch.bfloat16,
            attn_implementation={"text_config": attention, "vision_config": "sdpa"},
        ).eval()

    processor = AutoProcessor.from_pretrained(path)
    recording, eager = bf16(EAGER_ATTENTION_NAME), bf16("eager")
    steps, orders_differ = 5, 0
    for index in (0, 1, 2):
        inputs = batch(processor, (index,))
        visual = inputs["input_ids"] == recording.config.image_token_id
        run = run_guide(recording, recording.model.language_model, dict(inputs), visual, steps, [-1])
        assert run.lengths.tolist() == [steps], "a multi-token answer: prefill plus four decode steps"
        ours = run.importance[0]
        official, running = official_bf16_importance(eager, inputs, visual, steps)
        assert ours.dtype == official.dtype == torch.bfloat16
        assert torch.equal(ours, official), f"sample {index}: bf16 importance differs from the official sum"
        orders_differ += not torch.equal(official, running)
        for ratio in (0.05, 0.2, 0.4):
            ours_plan = plan_from_scores([ours], visual, inputs["attention_mask"], ratio)
            official_plan = plan_from_scores([official], visual, inputs["attention_mask"], ratio)
            assert torch.equal(ours_plan.index, official_plan.index)
    assert orders_differ, "the inputs must tell the official order from one running total"


def test_settings_refuse_unknown_precision():
    with pytest.raises(ValueError, match=r"importance_precision='bf16' is not one of \('fp32', 'model'\)"):
        SGLSettings(importance_precision="bf16")
