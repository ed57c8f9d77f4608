"""The SGL pipeline on the factory checkpoints: oracles, exits, batching and fallbacks."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline
from tests.helpers import kept_visual_sets

FAMILIES = {"internvl": InternVLFamily, "llava": LlavaFamily, "llava-ov": LlavaFamily}
GEN = GenerationSettings.from_gen_kwargs({"max_new_tokens": 5, "until": ["\n\n"]})


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, models_dir):
    family = FAMILIES[request.param](max_tiles=6)
    load = {"dtype": torch.float32, "device_map": "cpu", "text_attention": ATTENTION_NAME}
    guide = family.load(str(models_dir / f"{request.param}-guide"), **load)
    large = family.load(str(models_dir / f"{request.param}-large"), **load)
    return guide, large


def samples():
    specs = [
        ("What color is the circle?", [Image.new("RGB", (800, 500), (200, 20, 20))]),
        ("Is it?", [Image.new("RGB", (448, 448), (20, 20, 200))]),
        (
            "Two pictures: which is brighter?",
            [Image.new("RGB", (300, 300), "white"), Image.new("RGB", (448, 900), "gray")],
        ),
        ("A question without any image?", []),
    ]
    return [Sample("t", i, Prompt(text, images)) for i, (text, images) in enumerate(specs)]


def answers(records):
    return [r.answer for r in records]


def test_keep_ratio_one_equals_large_only(pair):
    guide, large = pair
    full = SGLPipeline(large, guide, SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=1.0)).generate(
        samples(), GEN
    )
    alone = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(samples(), GEN)
    assert answers(full) == answers(alone)
    assert all(r.token_ratio == 1.0 for r in full if r.total_visual)


def test_batch_equals_one_by_one(pair, monkeypatch):
    guide, large = pair
    pipeline = SGLPipeline(large, guide, SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.2))
    kept = kept_visual_sets(monkeypatch)
    together = pipeline.generate(samples(), GEN)
    kept_together = list(kept)
    kept.clear()
    alone = [pipeline.generate([s], GEN)[0] for s in samples()]
    assert answers(together) == answers(alone)
    assert [r.kept_visual for r in together] == [r.kept_visual for r in alone]
    assert kept_together == kept and len(kept) == len(samples()), "keep sets must not depend on batching"
    assert all(kept[:3]) and not kept[3], "three samples with images keep some, the text-only one none"
    for a, b in zip(together, alone, strict=True):
        assert a.confidence == pytest.approx(b.confidence, rel=1e-4)
        assert a.flops == pytest.approx(b.flops)


def test_records_describe_what_happened(pair):
    guide, large = pair
    records = SGLPipeline(large, guide, SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.2)).generate(
        samples(), GEN
    )
    for record in records[:3]:
        assert record.reached_large and not record.exited and record.fallback is None
        assert record.kept_visual == max(1, int(record.total_visual * 0.2))
        assert record.token_ratio == pytest.approx((2 + 2 * record.kept_visual / record.total_visual) / 4)
        assert 0 < record.confidence <= 1 and record.consistency is None and record.exit_score is None
        assert "record_exit_score=true" in record.extra["exit_score_skipped"]  # no threshold: not computed
        assert record.flops > 0 and record.flops_large_alone > 0
    text_only = records[3]
    assert text_only.total_visual == 0 and text_only.token_ratio is None and text_only.answer is not None


@contextmanager
def forward_calls(loaded):
    """Counts the calls of a model's text model."""
    calls = []
    handle = loaded.text_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_consistency_pass_runs_only_when_something_reads_it(pair):
    """No exit_threshold: the guide makes no consistency forward and its FLOPs leave it out; with a
    threshold (which exits nothing here) or record_exit_score it makes one forward for the batch,
    its exit scores are recorded and its FLOPs are exactly the pass's."""
    guide, large = pair
    common = {"method": "sgl", "prune_layer": 0.5, "keep_ratio": 0.2}
    runs = {}
    for name, extra in (
        ("skipped", {}),
        ("threshold", {"exit_threshold": 1.0}),
        ("recorded", {"record_exit_score": True}),
    ):
        with forward_calls(guide) as calls:
            records = SGLPipeline(large, guide, SGLSettings(**common, **extra)).generate(samples(), GEN)
        runs[name] = (len(calls), records)
    skipped_calls, skipped = runs["skipped"]
    assert all(r.exit_score is None and r.consistency is None and not r.exited for r in skipped)
    assert all("consistency_flops" not in r.extra and r.extra["exit_score_skipped"] for r in skipped)
    for name in ("threshold", "recorded"):
        calls, records = runs[name]
        assert calls == skipped_calls + 1, name  # one batched consistency forward, nothing else
        assert answers(records) == answers(skipped) and not any(r.exited for r in records)
        for with_pass, without in zip(records, skipped, strict=True):
            assert 0 <= with_pass.consistency <= 1 and with_pass.exit_score is not None
            assert "exit_score_skipped" not in with_pass.extra
            paid = with_pass.extra["consistency_flops"]
            assert paid > 0
            assert with_pass.extra["guide_flops"] == without.extra["guide_flops"] + paid
            assert with_pass.flops == pytest.approx(without.flops + paid, rel=1e-12)


def test_record_exit_score_is_refused_without_a_guide_ranking():
    with pytest.raises(ValueError, match="record_exit_score=true records the guide's exit score"):
        SGLSettings(method="large_only", record_exit_score=True)
    from lmms_sgl.lmms.args import parse_model_args

    args = parse_model_args(pretrained="x", guide="g", record_exit_score="true")
    assert args.settings.record_exit_score is True and args.settings.scores_exit
    assert not parse_model_args(pretrained="x", guide="g").settings.scores_exit
    with pytest.raises(ValueError, match="record_exit_score='maybe' must be true or false"):
        parse_model_args(pretrained="x", guide="g", record_exit_score="maybe")


def test_threshold_zero_exits_everything_without_calling_the_large_model(pair, monkeypatch):
    guide, large = pair
    pipeline = SGLPipeline(large, guide, SGLSettings(method="sgl", exit_threshold=0.0))
    monkeypatch.setattr(large.model, "generate", lambda *a, **k: pytest.fail("the large model ran"))
    records = pipeline.generate(samples(), GEN)
    assert all(r.exited and not r.reached_large and r.answer == r.guide_answer for r in records)
    assert all(r.flops < r.flops_large_alone for r in records[:3])


def test_threshold_one_exits_nothing(pair):
    guide, large = pair
    records = SGLPipeline(large, guide, SGLSettings(method="sgl", exit_threshold=1.0)).generate(
        samples(), GEN
    )
    assert not any(r.exited for r in records) and all(r.reached_large for r in records)


def test_guide_only_answers_with_the_guide(pair):
    guide, large = pair
    sgl = SGLPipeline(large, guide, SGLSettings(method="sgl", exit_threshold=0.0)).generate(samples(), GEN)
    only = SGLPipeline(large, guide, SGLSettings(method="guide_only")).generate(samples(), GEN)
    assert answers(only) == [r.guide_answer for r in sgl]
    assert all(not r.reached_large and r.flops_large_alone > 0 for r in only)


def test_layout_mismatch_falls_back_to_all_visual_tokens(pair, monkeypatch):
    guide, large = pair
    pipeline = SGLPipeline(large, guide, SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.2))
    family = guide.family
    original = family.build_batch

    def different_image_for_the_guide(loaded, prompts):
        if loaded is guide:  # the guide sees another image size for sample 1 -> other token count
            prompts = [
                Prompt(p.text, [Image.new("RGB", (1344, 448))]) if i == 1 else p
                for i, p in enumerate(prompts)
            ]
        return original(loaded, prompts)

    monkeypatch.setattr(family, "build_batch", different_image_for_the_guide)
    records = pipeline.generate(samples()[:2], GEN)
    if records[1].total_visual == 256 and "llava-ov" not in large.path and isinstance(family, LlavaFamily):
        pytest.skip("LLaVA-1.5 has a fixed 256-token layout: no mismatch to provoke")
    assert "layout mismatch" in records[1].fallback
    assert records[1].kept_visual == records[1].total_visual and records[1].token_ratio == 1.0
    assert records[0].fallback is None and records[0].kept_visual < records[0].total_visual


def test_a_failing_sample_falls_back_and_the_batch_survives(pair, monkeypatch):
    guide, large = pair
    pipeline = SGLPipeline(large, guide, SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.2))
    alone = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(samples(), GEN)
    original = pipeline._run_guide

    def broken_for_doc_2(batch, records, gen, *rest):
        if any(s.doc_id == 2 for s in batch):
            raise RuntimeError("simulated guide failure")
        return original(batch, records, gen, *rest)

    monkeypatch.setattr(pipeline, "_run_guide", broken_for_doc_2)
    records = pipeline.generate(samples(), GEN)
    assert [r.doc_id for r in records] == [0, 1, 2, 3]
    assert "simulated guide failure" in records[2].fallback and records[2].answer == alone[2].answer
    assert all(r.fallback is None for i, r in enumerate(records) if i != 2)


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_baselines_prune_the_same_amount(pair, method):
    guide, large = pair
    records = SGLPipeline(large, None, SGLSettings(method=method, prune_layer=0.5, keep_ratio=0.2)).generate(
        samples(), GEN
    )
    for record in records[:3]:
        assert (
            record.kept_visual == max(1, int(record.total_visual * 0.2))
            and record.flops < record.flops_large_alone
        )


def test_loglikelihood_keep_all_equals_unpruned(pair):
    guide, large = pair
    sample = samples()[0]
    (full, _), record = SGLPipeline(large, guide, SGLSettings(prune_layer=0.5, keep_ratio=1.0)).loglikelihood(
        sample, " red"
    )
    (alone, _), _ = SGLPipeline(large, None, SGLSettings(method="large_only")).loglikelihood(sample, " red")
    assert full == pytest.approx(alone, abs=1e-4)
    (pruned, _), record = SGLPipeline(
        large, guide, SGLSettings(prune_layer=0.5, keep_ratio=0.1)
    ).loglikelihood(sample, " red")
    assert record.kept_visual < record.total_visual and pruned != pytest.approx(alone, abs=1e-4)


def test_beam_search_expands_the_keep_plan(pair):
    guide, large = pair
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 4, "num_beams": 3})
    pipeline = SGLPipeline(large, guide, SGLSettings(prune_layer=0.5, keep_ratio=0.2))
    together = pipeline.generate(samples()[:2], gen)
    assert answers(together) == [pipeline.generate([s], gen)[0].answer for s in samples()[:2]]
    assert all(r.fallback is None for r in together)
    keep_all = SGLPipeline(large, guide, SGLSettings(prune_layer=0.5, keep_ratio=1.0)).generate(
        samples()[:2], gen
    )
    alone = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(samples()[:2], gen)
    assert answers(keep_all) == answers(alone)


def test_loglikelihood_falls_back_to_the_unpruned_model(pair, monkeypatch):
    guide, large = pair
    pipeline = SGLPipeline(large, guide, SGLSettings(prune_layer=0.5, keep_ratio=0.2))
    monkeypatch.setattr(pipeline, "_guide_prompt_importance", lambda sample: 1 / 0)
    (value, _), record = pipeline.loglikelihood(samples()[0], " red")
    (alone, _), _ = SGLPipeline(large, None, SGLSettings(method="large_only")).loglikelihood(
        samples()[0], " red"
    )
    assert "ZeroDivisionError" in record.fallback and value == pytest.approx(alone, abs=1e-5)
    assert record.kept_visual == record.total_visual


def test_loglikelihood_costs_are_per_request(pair):
    """A text-only request after an image request pays no guide cost (nothing was guided)."""
    guide, large = pair
    pipeline = SGLPipeline(large, guide, SGLSettings(prune_layer=0.5, keep_ratio=0.2))
    _, with_image = pipeline.loglikelihood(samples()[0], " red")
    assert with_image.flops > 0 and with_image.kept_visual < with_image.total_visual
    _, text_only = pipeline.loglikelihood(samples()[3], " no")
    assert text_only.total_visual == 0 and text_only.flops == text_only.flops_large_alone


def test_loglikelihood_is_the_mean_token_loss_of_the_answer(pair):
    """What lmms-eval's own models return (it picks the lowest): transformers' mean cross-entropy
    over the continuation tokens, here computed by the model itself from ``labels``."""
    _, large = pair
    sample = samples()[0]
    (loss, _), _ = SGLPipeline(large, None, SGLSettings(method="large_only")).loglikelihood(sample, " red")
    prompt = large.family.encode(
        large, [large.family.prompt_text(large, sample.prompt)], sample.prompt.images
    )
    answer = large.tokenizer("red", add_special_tokens=False, return_tensors="pt").input_ids
    input_ids = torch.cat([prompt["input_ids"], answer], dim=1)
    labels = input_ids.clone()
    labels[:, : prompt["input_ids"].shape[1]] = -100
    inputs = {**prompt, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad():
        expected = large.model(**inputs, labels=labels).loss
    assert loss == pytest.approx(float(expected), abs=1e-5)
