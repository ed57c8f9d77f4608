"""Speculative decoding (``draft=guide``): answers equal plain greedy decoding token for token, the KV
cache after a rejection equals one that never saw the rejected tokens, FLOPs equal the counter's."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from lmms_sgl.factory.scripted_pairs import save_pair
from lmms_sgl.families import InternVLFamily, LlavaFamily, LoadedVLM, Prompt, QwenVLFamily
from lmms_sgl.method.drafting import (
    LONGEST_PAUSE,
    MISSES_TO_PAUSE,
    PAUSE_STEPS,
    START_DRAFT,
    DecodeState,
    DraftSchedule,
)
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores, random_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline
from lmms_sgl.pipeline.drafting import (
    check_shared_tokenizer,
    draft_only_step,
    drafted_generate,
    greedy_prefill,
    record_drafting,
)
from lmms_sgl.pipeline.records import SampleRecord
from lmms_sgl.reporting.stats import RunStats

FAMILIES = {
    "internvl": lambda: InternVLFamily(max_tiles=1),
    "llava": LlavaFamily,
    "qwen2-vl": lambda: QwenVLFamily(max_pixels=112 * 112),
}
# Qwen2.5-VL and Qwen3-VL (deepstack) share Qwen2-VL's adapter; their random pairs are drafted too.
ADAPTERS = {**FAMILIES, "qwen2.5-vl": FAMILIES["qwen2-vl"], "qwen3-vl": FAMILIES["qwen2-vl"]}
ROOT = Path(__file__).resolve().parent.parent
LOAD = {"dtype": torch.float32, "device_map": "cpu"}


def samples(count: int = 4) -> list[Sample]:
    specs = [
        ("What color is the circle?", [Image.new("RGB", (448, 448), (200, 20, 20))]),
        ("Is it?", [Image.new("RGB", (224, 300), (20, 20, 200))]),
        ("How many objects are there in the picture?", [Image.new("RGB", (300, 224), (20, 160, 20))]),
        ("A question without any image?", []),
    ]
    return [Sample("t", i, Prompt(text, images)) for i, (text, images) in enumerate(specs[:count])]


def load_pair(family: str, guide: Path, large: Path):
    make = ADAPTERS[family]
    return make().load(str(guide), text_attention=ATTENTION_NAME, **LOAD), make().load(
        str(large), text_attention="sdpa", **LOAD
    )


def run(large, guide, gen, count=4, **settings):
    pipeline = SGLPipeline(large, guide, SGLSettings(**settings))
    return pipeline.generate(samples(count), gen)


def assert_same_answers(drafted, plain):
    assert [r.answer for r in drafted] == [r.answer for r in plain]
    assert [r.output_tokens for r in drafted] == [r.output_tokens for r in plain]
    assert all(r.fallback is None for r in drafted), [r.fallback for r in drafted]
    assert all("drafting" in r.extra for r in drafted)


# -- natural agreement: the factory's random pairs (rarely agree) and the trained proving pair ---------
@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_random_pairs_drafted_equals_plain_with_pruning(family, models_dir):
    guide, large = load_pair(family, models_dir / f"{family}-guide", models_dir / f"{family}-large")
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 12})
    for prune_layer, count in ((0.5, 4), (0.0, 1)):
        common = {"method": "sgl", "prune_layer": prune_layer, "keep_ratio": 0.2}
        plain = run(large, guide, gen, count, **common)
        drafted = run(large, guide, gen, count, **common, draft="guide", draft_tokens=3)
        assert_same_answers(drafted, plain)


@pytest.fixture(scope="module")
def trained_pair():
    folder = ROOT / "models"
    return load_pair("internvl", folder / "shapes-internvl-guide", folder / "shapes-internvl-large")


def test_trained_pair_drafted_equals_plain(trained_pair):
    guide, large = trained_pair
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 8})
    common = {"method": "sgl", "prune_layer": 0.5, "keep_ratio": 0.35}
    plain = run(large, guide, gen, **common)
    drafted = run(large, guide, gen, **common, draft="guide")
    assert_same_answers(drafted, plain)
    assert sum(r.extra["drafting"]["accepted"] for r in drafted) > 0, "the trained pair should agree"


def test_drafting_with_early_exit_equals_plain_with_early_exit(trained_pair):
    """The same samples exit with the same guide answers; the others are drafted and answer as the
    plain pruned large model does."""
    guide, large = trained_pair
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 8})
    common = {"method": "sgl", "prune_layer": 0.5, "keep_ratio": 0.35}
    scores = sorted(r.exit_score for r in run(large, guide, gen, **common, record_exit_score=True))
    threshold = (scores[1] + scores[2]) / 2  # two of the four samples exit
    plain = run(large, guide, gen, **common, exit_threshold=threshold)
    drafted = run(large, guide, gen, **common, exit_threshold=threshold, draft="guide")
    exits = [r.exit_score >= threshold for r in plain]
    assert [r.exited for r in plain] == [r.exited for r in drafted] == exits
    assert sum(r.exited for r in drafted) == 2
    assert [(r.answer, r.output_tokens) for r in drafted] == [(r.answer, r.output_tokens) for r in plain]
    assert all(r.fallback is None for r in drafted)
    reached = [r for r in drafted if not r.exited]
    assert all(r.reached_large and "drafting" in r.extra for r in reached)
    assert all(not r.reached_large for r in drafted if r.exited)


# -- scripted agreement patterns ---------------------------------------------------------------------
PATTERNS = {
    "agrees-then-diverges": lambda i: i < 12 or i % 3 == 0,
    "never-agrees": lambda i: False,
    "always-agrees": lambda i: True,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def scripted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"scripted-{request.param}")
    pairs = {}
    for name, agree in PATTERNS.items():
        guide, large, chain = save_pair(request.param, out / name, 24, agree)
        pairs[name] = (*load_pair(request.param, guide, large), chain, (guide, large))
    return request.param, pairs


MATRIX = {  # pattern -> (settings, batch size) of the drafted runs, kept small for the suite's time
    "agrees-then-diverges": (
        ({"method": "sgl", "prune_layer": 0.5, "keep_ratio": 0.2}, 4),
        ({"method": "sgl", "prune_layer": 0.0, "keep_ratio": 0.2}, 1),
    ),
    "never-agrees": (({"method": "sgl", "prune_layer": 0.5, "keep_ratio": 0.2}, 1),),
    "always-agrees": (({"method": "large_only"}, 4),),
}


def test_scripted_patterns_equal_plain(scripted):
    """The scripted large model's greedy answer is its chain whatever it keeps and whatever the
    prompt, so one plain run is the oracle of every configuration and sample (the random and trained
    pairs above check pruning-sensitive answers)."""
    family, pairs = scripted
    long = GenerationSettings.from_gen_kwargs({"max_new_tokens": 30})  # the whole 24-token answer + EOS
    for name, (guide, large, chain, _) in pairs.items():
        (plain,) = run(large, guide, long, 1, method="large_only")
        assert plain.output_tokens == len(chain)  # the script holds
        for settings, count in MATRIX[name]:
            drafted = run(large, guide, long, count, **settings, draft="guide", draft_tokens=4)
            assert_same_answers(drafted, [plain] * count)
            accepted = drafted[0].extra["drafting"]["accepted"]
            if name == "never-agrees":
                assert accepted == 0
            elif name == "always-agrees":  # 4 drafts + the large model's own token per forward
                assert drafted[0].extra["drafting"]["large_forwards"] == 1 + -(-(len(chain) - 1) // 5)
            else:
                assert 0 < accepted < drafted[0].extra["drafting"]["drafted"]


def test_max_new_tokens_and_stop_string_inside_a_verified_chunk(scripted):
    family, pairs = scripted
    guide, large, chain, _ = pairs["always-agrees"]
    stop = large.tokenizer.decode(chain[6:8])  # completed by the 8th answer token, mid-chunk
    for kwargs in ({"max_new_tokens": 7}, {"max_new_tokens": 30, "until": [stop]}):
        gen = GenerationSettings.from_gen_kwargs(kwargs)
        plain = run(large, guide, gen, 2, method="sgl", prune_layer=0.5, keep_ratio=0.2)
        drafted = run(large, guide, gen, 2, method="sgl", prune_layer=0.5, keep_ratio=0.2, draft="guide")
        assert_same_answers(drafted, plain)
        assert all(r.output_tokens in (7, 8) for r in drafted)


# -- the KV cache after a rejection ------------------------------------------------------------------
@pytest.mark.parametrize("layer_k", [0, 2])
def test_cache_after_rejection_equals_cache_that_never_saw_it(models_dir, layer_k):
    large = InternVLFamily(max_tiles=1).load(
        str(models_dir / "internvl-large"), text_attention="sdpa", **LOAD
    )
    inputs = large.family.build_batch(large, [samples(1)[0].prompt])
    visual = inputs["input_ids"] == large.image_token_id
    plan = plan_from_scores(random_scores(visual, 3), visual, inputs["attention_mask"], 0.25)
    caches = []
    with VisualTokenPruner(large.text_model, layer_k).installed() as pruner:
        for chunks, keep in (([[5, 6, 7, 8], [9]], 2), ([[5, 6], [9]], 2)):
            pruner.arm(plan)
            first, state = greedy_prefill(large, inputs, 8)
            state.forward(large.model, [chunks[0]], 0)
            state.keep(0, keep)  # the first forward: 2 accepted, the second never saw 7 and 8
            logits = state.forward(large.model, [chunks[1]], 0)
            caches.append((state, logits[0]))
    (drafted, after), (clean, expected) = caches
    assert torch.equal(drafted.mask, clean.mask)
    for a, b in zip(drafted.cache.layers, clean.cache.layers, strict=True):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-4)


def test_holes_of_one_row_do_not_touch_the_other(models_dir):
    """Batch rows with different acceptance: a row's logits equal its solo run's."""
    large = LlavaFamily().load(str(models_dir / "llava-large"), text_attention="sdpa", **LOAD)
    prompts = [s.prompt for s in samples(2)]
    batch = large.family.build_batch(large, prompts)
    _, together = greedy_prefill(large, batch, 8)
    together.forward(large.model, [[5, 6, 7], [9, 10, 11]], 0)
    together.keep(0, 1)
    together.keep(1, 3)
    both = together.forward(large.model, [[12, 13], [14]], 0)
    for row, fed, next_chunk in ((0, [5], [12, 13]), (1, [9, 10, 11], [14])):
        solo_inputs = large.family.build_batch(large, [prompts[row]])
        _, solo = greedy_prefill(large, solo_inputs, 8)
        solo.forward(large.model, [fed], 0)
        alone = solo.forward(large.model, [next_chunk], 0)[0]
        torch.testing.assert_close(both[row], alone, rtol=0, atol=1e-4)


# -- FLOPs -------------------------------------------------------------------------------------------
def test_drafted_flops_equal_the_flop_counter(scripted):
    """Eager attention: the flop counter does not count CPU SDPA kernels (as tests/test_method_cost)."""
    family, pairs = scripted
    folders = pairs["agrees-then-diverges"][3]
    guide, large = (FAMILIES[family]().load(str(f), text_attention="eager", **LOAD) for f in folders)
    sample = samples(4)[3]  # no image: the text models' forwards only
    record = SampleRecord("t", 3)
    drafts = draft_only_step(guide, [sample], [record])
    inputs = large.family.build_batch(large, [sample.prompt])
    with FlopCounterMode(display=False) as counter:
        drafted = drafted_generate(large, inputs, drafts, 30, 4, ())
    prompt = inputs["input_ids"].shape[1]
    large_flops = record_drafting(large, guide, drafted, record, 0, 0.0, prompt, None, None)
    stats = drafted.stats[0]
    assert stats.accepted < stats.drafted and drafted.guide.forwards[0], "rejections and guide drafting"
    assert counter.get_total_flops() == large_flops + record.extra["drafting"]["guide_drafting_flops"]


# -- the adaptive policy: draft length and pauses -------------------------------------------------------
def test_schedule_grows_shrinks_pauses_and_backs_off():
    assert DraftSchedule(2).wanted == 2 and START_DRAFT == 4 and MISSES_TO_PAUSE == 2
    schedule = DraftSchedule(8)
    lengths = []
    for _ in range(3):  # all accepted: grows by 2 up to draft_tokens
        lengths.append(schedule.wanted)
        schedule.update(schedule.wanted, schedule.wanted)
    assert lengths == [4, 6, 8] and schedule.wanted == 8
    schedule.update(8, 3)  # a rejection shrinks by 1
    schedule.update(7, 0)  # a miss (nothing accepted)
    assert schedule.wanted == 6 and schedule.pauses == 0
    schedule.update(6, 0)  # the second miss in a row pauses drafting
    assert schedule.pauses == 1
    pause = PAUSE_STEPS
    for _ in range(5):  # failed retries double the pause, up to LONGEST_PAUSE
        for _ in range(pause):
            assert schedule.wanted == 0
            schedule.update(0, 0)
        assert schedule.wanted == 1  # the retry: one draft
        schedule.update(1, 0)
        pause = min(2 * pause, LONGEST_PAUSE)
        assert schedule.pause_left == pause
    assert pause == LONGEST_PAUSE and schedule.pauses == 6
    for _ in range(pause):
        schedule.update(0, 0)
    schedule.update(1, 1)  # a retry that accepts resumes drafting from 1, growing
    assert schedule.wanted == 3 and schedule.pause_length == PAUSE_STEPS and not schedule.pause_left
    assert schedule.rounds == 6 + 5 + 1 and schedule.drafted == 4 + 6 + 8 + 8 + 7 + 6 + 5 + 1
    assert schedule.accepted == 4 + 6 + 8 + 3 + 1 and schedule.longest == 8
    assert schedule.paused_steps == 8 + 16 + 32 + 64 + 64 + 64


@contextmanager
def fed_tokens(loaded):
    """New tokens per call of a model's text model, in call order."""
    calls = []

    def grab(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        calls.append((embeds if embeds is not None else kwargs["input_ids"]).shape[1])

    handle = loaded.text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def long_pairs(tmp_path_factory):
    """InternVL scripted pairs with a 96-token answer (+ EOS): long enough for several pauses."""
    out = tmp_path_factory.mktemp("long-scripted")
    pairs = {}
    for name in ("never-agrees", "always-agrees"):
        guide, large, chain = save_pair("internvl", out / name, 96, PATTERNS[name])
        pairs[name] = (*load_pair("internvl", guide, large), chain)
    return pairs


LONG = GenerationSettings.from_gen_kwargs({"max_new_tokens": 120})


def test_never_agreeing_guide_pauses_and_the_large_model_decodes_plainly(long_pairs):
    guide, large, chain = long_pairs["never-agrees"]
    (plain,) = run(large, guide, LONG, 1, method="large_only")
    with fed_tokens(large) as large_calls, fed_tokens(guide) as guide_calls:
        (drafted,) = run(large, guide, LONG, 1, method="large_only", draft="guide", draft_tokens=4)
    assert_same_answers([drafted], [plain])
    stats, generated = drafted.extra["drafting"], drafted.output_tokens
    assert generated == len(chain) and stats["accepted"] == 0
    verification = large_calls[1:]  # after the prefill: one forward per answer token, as plain decoding
    assert len(large_calls) == stats["large_forwards"] == generated
    # two missed rounds (4 then 3 drafts), then plain steps and one-draft retries only; a fixed draft
    # length would feed 5 tokens per answer token
    assert verification[:2] == [5, 4] and set(verification[2:]) == {1, 2}
    assert sum(verification) / len(verification) <= 1.15
    assert stats["pauses"] >= 3 and stats["rounds"] == 2 + stats["pauses"] - 1  # retries failed
    assert stats["paused_steps"] == len(verification) - stats["rounds"] == verification.count(1)
    assert len(guide_calls) == 1 + stats["drafted"] == 1 + 4 + 3 + stats["pauses"] - 1  # prefill + drafts


def test_always_agreeing_guide_drafts_longer_rounds(long_pairs):
    guide, large, chain = long_pairs["always-agrees"]
    (plain,) = run(large, guide, LONG, 1, method="large_only")
    with fed_tokens(large) as large_calls:
        (drafted,) = run(large, guide, LONG, 1, method="large_only", draft="guide", draft_tokens=8)
    assert_same_answers([drafted], [plain])
    stats = drafted.extra["drafting"]
    assert large_calls[1:4] == [5, 7, 9] and max(large_calls[1:]) == 9  # 4, 6, 8 drafts, capped at 8
    assert stats["longest_draft"] == 8 and stats["pauses"] == 0 and stats["accepted"] == stats["drafted"]
    fixed = 1 + -(-(len(chain) - 1) // 5)  # what 4 drafts per round would take
    assert stats["large_forwards"] == len(large_calls) < fixed - 5


@pytest.mark.parametrize("pattern", ["never-agrees", "agrees-then-diverges"])
def test_pipeline_flops_of_lazy_drafting_equal_the_flop_counter(scripted, pattern):
    """``large_only`` + ``draft=guide`` end to end (the guide's prefill, its drafts on demand, pauses):
    the record's FLOPs are exactly what the counter saw (text-only sample, eager attention)."""
    family, pairs = scripted
    folders = pairs[pattern][3]
    guide, large = (FAMILIES[family]().load(str(f), text_attention="eager", **LOAD) for f in folders)
    pipeline = SGLPipeline(large, guide, SGLSettings(method="large_only", draft="guide"))
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 30})
    with FlopCounterMode(display=False) as counter:
        (record,) = pipeline.generate([samples(4)[3]], gen)
    assert record.fallback is None and record.extra["drafting"]["rounds"] > 0
    if pattern == "never-agrees":
        assert record.extra["drafting"]["pauses"] > 0
    assert counter.get_total_flops() == record.flops


# -- arguments, tokenizers, statistics -----------------------------------------------------------------
def test_settings_refuse_draft_where_it_does_not_apply():
    with pytest.raises(ValueError, match="draft='guide' applies to method in"):
        SGLSettings(method="fastv", draft="guide")
    with pytest.raises(ValueError, match="draft_tokens=0 must be"):
        SGLSettings(draft="guide", draft_tokens=0)
    with pytest.raises(ValueError, match="draft='beam' is not one of"):
        SGLSettings(draft="beam")
    from lmms_sgl.lmms.args import parse_model_args

    with pytest.raises(ValueError, match="draft='guide' needs guide="):
        parse_model_args(pretrained="x", method="large_only", draft="guide")
    args = parse_model_args(pretrained="x", guide="g", method="large_only", draft="guide", draft_tokens="6")
    assert args.guide == "g" and args.settings.draft_tokens == 6


def test_different_tokenizers_are_refused(scripted):
    family, pairs = scripted
    guide, large, *_ = pairs["never-agrees"]
    check_shared_tokenizer(large, guide)
    processor = copy.deepcopy(guide.processor)
    processor.tokenizer.add_tokens(["<only-in-the-guide>"])
    other = LoadedVLM(guide.family, guide.model, processor, guide.path)
    with pytest.raises(ValueError, match=r"share token ids; 1 of .* tokens differ .*only-in-the-guide"):
        check_shared_tokenizer(large, other)


def test_sampling_is_not_drafted_and_counted(scripted):
    family, pairs = scripted
    guide, large, *_ = pairs["always-agrees"]
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 6, "num_beams": 2})
    records = run(large, guide, gen, 2, method="large_only", draft="guide")
    assert all(r.extra["draft_not_applied"] == "num_beams=2" and "drafting" not in r.extra for r in records)
    summary = _summary(records)
    assert summary["draft_not_applied"] == 2 and summary["acceptance_rate"] is None


def test_run_statistics_of_drafting(scripted):
    family, pairs = scripted
    guide, large, chain, _ = pairs["agrees-then-diverges"]
    gen = GenerationSettings.from_gen_kwargs({"max_new_tokens": 30})
    records = run(large, guide, gen, 2, method="large_only", draft="guide")
    summary = _summary(records)
    drafting = [r.extra["drafting"] for r in records]
    assert summary["acceptance_rate"] == sum(d["accepted"] for d in drafting) / sum(
        d["drafted"] for d in drafting
    )
    forwards = sum(d["large_forwards"] for d in drafting)
    assert summary["tokens_per_large_forward"] == 2 * len(chain) / forwards > 1


def _summary(records) -> dict:
    stats = RunStats.empty()
    for record in records:
        stats.add(record.as_dict())
    halves = [stats.as_payload(), RunStats.empty().as_payload()]
    return RunStats.from_payloads(halves).summary()["overall"]


def test_decode_state_refuses_keeping_more_than_it_has(models_dir):
    large = LlavaFamily().load(str(models_dir / "llava-large"), text_attention="sdpa", **LOAD)
    _, state = greedy_prefill(large, large.family.build_batch(large, [samples(1)[0].prompt]), 4)
    assert isinstance(state, DecodeState)
    with pytest.raises(ValueError, match="row 0 has 0 answer tokens cached, cannot keep 1"):
        state.keep(0, 1)
