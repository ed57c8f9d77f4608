"""Video through SGL (issue 28): sgl_qwen2_vl (native video, 3-D RoPE with temporal positions),
sgl_llava (LLaVA-OneVision native video: frames pooled 2 x 2, one newline) and sgl_internvl2 (frames
as 448 px tiles), on the local ``sgl_video`` clips and the tiny factory pairs."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt, QwenVLFamily
from lmms_sgl.families.video import VideoError, open_video
from lmms_sgl.lmms.args import parse_model_args
from lmms_sgl.method import cost
from lmms_sgl.method.importance import ATTENTION_NAME, AttentionRecorder, prompt_rows_from_last_visual
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores, random_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.units import kept_visual_mask, units_to_encode
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline
from lmms_sgl.pipeline.generation import guide_step
from lmms_sgl.pipeline.records import SampleRecord
from tests.helpers import assert_mass_equals_output_attentions

LOAD = {"dtype": torch.float32, "device_map": "cpu"}
GEN = GenerationSettings.from_gen_kwargs({"max_new_tokens": 4, "until": ["\n\n"]})
PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}  # 4 to 16 tokens per temporal patch
VIDEOS = Path(__file__).resolve().parent.parent / "tasks" / "sgl_video" / "data" / "videos"
CLIP_32, CLIP_48 = VIDEOS / "video-000.mp4", VIDEOS / "video-003.mp4"


def family_of(name: str, frames: int):
    family = {"qwen2.5-vl": lambda: QwenVLFamily(**PIXELS), "llava-ov-video": LlavaFamily}.get(
        name, InternVLFamily
    )()
    family.num_frames = frames
    return family


@pytest.fixture(scope="module", params=["qwen2.5-vl", "llava-ov-video", "internvl"])
def pair(request, models_dir):
    """(guide with the recording attention, large with SDPA) of one family, 8 frames per clip."""
    family = family_of(request.param, 8)
    guide = family.load(str(models_dir / f"{request.param}-guide"), text_attention=ATTENTION_NAME, **LOAD)
    large = family.load(str(models_dir / f"{request.param}-large"), text_attention="sdpa", **LOAD)
    return guide, large


def clip_prompt(path: Path, question: str = "Which way does the square move?") -> Prompt:
    return Prompt(question, [], [open_video(str(path))])


# -- the visual tokens of a video ------------------------------------------------------------------
def test_video_tokens_and_temporal_positions(pair):
    """Qwen: one video token per merged patch of each 2-frame temporal patch, with temporal RoPE
    positions that grow frame group by frame group; LLaVA-OneVision: 4 x 4 pooled tokens per 112 px
    frame and one newline; InternVL: 256 tokens per frame."""
    _, large = pair
    inputs = large.family.build_batch(large, [clip_prompt(CLIP_32)])
    visual = large.visual_mask(inputs["input_ids"])
    if large.family.name == "qwen_vl":
        t, h, w = inputs["video_grid_thw"][0].tolist()
        assert t == 4 and int(visual.sum()) == t * h * w // 4  # 8 frames, 2 per temporal patch
        positions, _ = large.model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=inputs["attention_mask"],
        )
        temporal = positions[0, 0][visual[0]].reshape(t, -1)
        assert (temporal.diff(dim=0) > 0).all() and (temporal == temporal[:, :1]).all()
    elif large.family.name == "llava":
        assert tuple(inputs["pixel_values_videos"].shape) == (1, 8, 3, 112, 112)
        assert int(visual.sum()) == 8 * 16 + 1
    else:
        assert int(visual.sum()) == 8 * 256 and inputs["pixel_values"].shape[0] == 8


# -- oracles ---------------------------------------------------------------------------------------
def reference_logits(loaded, inputs: dict, keep: torch.Tensor, layer_k: int, generated: torch.Tensor):
    """Logits of prompt + ``generated`` without the pruner or cache: the unpruned model gives layer
    K's input on the whole sequence; layers K.. run by hand over the kept prompt rows and the
    generated rows, each with its original position (Qwen: the 3-D (t, h, w) position
    ``get_rope_index`` computes for the whole sequence; InternVL: its 1-D index)."""
    model, text = loaded.model, loaded.text_model
    length = inputs["input_ids"].shape[1]
    sequence = torch.cat([inputs["input_ids"], generated], dim=1)
    mask = torch.ones_like(sequence)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated)], 1)
        positions, _ = model.model.get_rope_index(
            sequence,
            extra["mm_token_type_ids"],
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=mask,
        )
    else:
        positions = torch.arange(sequence.shape[1])[None]
    seen = {}
    hook = text.layers[layer_k].register_forward_pre_hook(
        lambda m, a, k: seen.update(hidden=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    try:
        model(input_ids=sequence, attention_mask=mask, use_cache=False, **extra)
    finally:
        hook.remove()
    rows = torch.cat([keep, torch.arange(length, sequence.shape[1])])
    hidden = seen["hidden"][:, rows]
    gathered = positions[..., rows]
    cos, sin = text.rotary_emb(hidden, gathered)
    causal = torch.full((len(rows), len(rows)), float("-inf")).triu(1)[None, None]
    for index in range(layer_k, len(text.layers)):
        hidden = text.layers[index](
            hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=gathered
        )
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.lm_head(text.norm(hidden))


@pytest.mark.parametrize("layer_k", [0, 2])
def test_pruned_logits_equal_the_masked_reference(pair, layer_k):
    """Prefill and every decode step of the pruned large model on a clip equal the reference that
    keeps every token's original (temporal) position."""
    _, large = pair
    inputs = large.family.build_batch(large, [clip_prompt(CLIP_48)])
    visual = large.visual_mask(inputs["input_ids"])
    plan = plan_from_scores(random_scores(visual, layer_k), visual, inputs["attention_mask"], 0.2)
    steps = 4
    pruner = VisualTokenPruner(large.text_model, layer_k)
    with pruner.installed(), torch.no_grad():
        pruner.arm(plan)
        prefill = large.model(**inputs).logits[0]
        pruner.arm(plan)
        out = large.model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        reference = reference_logits(large, inputs, plan.index[0], layer_k, out.sequences[:, length:-1])[0]
    kept = len(plan.index[0])
    assert (prefill - reference[:kept]).abs().max() <= 1e-5
    for step in range(steps):
        assert (out.logits[step][0] - reference[kept - 1 + step]).abs().max() <= 1e-5, step
    with torch.no_grad():
        unpruned = large.model(**inputs).logits[0, -1]
    assert (unpruned - prefill[-1]).abs().max() > 1e-4, "pruning must change the output"


def test_importance_equals_output_attentions(pair, models_dir):
    guide, _ = pair
    eager = guide.family.load(guide.path, text_attention="eager", **LOAD).model
    inputs = guide.family.build_batch(guide, [clip_prompt(CLIP_32)])
    visual = guide.visual_mask(inputs["input_ids"])
    rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"])
    steps = 3
    recorder = AttentionRecorder(rows)
    kwargs = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    with recorder.active(), torch.no_grad():
        sequences = guide.model.generate(**inputs, **kwargs)
    mass = recorder.finalize([steps - 1])
    assert_mass_equals_output_attentions(mass, sequences, eager, inputs, kwargs, rows, visual, steps)


def test_batch_of_clips_of_different_lengths_equals_each_alone(pair, tmp_path):
    """A 4-frame and a 32-frame clip at 6 frames requested: 4 and 6 frames (InternVL encodes them
    apart and pads them alike; Qwen flattens their patches; LLaVA-OneVision, as lmms-eval's
    ``llava_hf``, reads 6 frame indices of each, repeating frames of the short one). Guide
    importance equal to 1e-5, answers and kept counts equal. Keep sets are compared through the
    importance, not as index sets: the clips' identical background tokens tie exactly, and ties
    fall either way by float noise (2e-7 relative)."""
    from lmms_sgl.local_tasks.video import clip_frames, write_clip

    short = write_clip(clip_frames("left", "up", 4, (200, 30, 30), random.Random(0)), tmp_path / "s.mp4")
    guide, large = pair
    for model in (guide, large):
        model.family.num_frames = 6
    try:
        samples = [Sample("t", 0, clip_prompt(short)), Sample("t", 1, clip_prompt(CLIP_32, "Which way?"))]
        settings = SGLSettings(prune_layer=0.5, keep_ratio=0.2)
        records = [SampleRecord("t", i) for i in range(2)]
        scores, _ = guide_step(guide, settings, samples, records, GEN)
        for sample, together in zip(samples, scores, strict=True):
            alone, _ = guide_step(guide, settings, [sample], [SampleRecord("t", 0)], GEN)
            torch.testing.assert_close(together.values, alone[0].values, rtol=1e-5, atol=1e-7)
        pipeline = SGLPipeline(large, guide, settings)
        together = pipeline.generate(samples, GEN)
        alone = [pipeline.generate([s], GEN)[0] for s in samples]
    finally:
        for model in (guide, large):
            model.family.num_frames = 8
    if large.family.name == "llava":  # lmms-eval's llava_hf: num_frames indices whatever the length
        assert together[0].total_visual == together[1].total_visual == 6 * 16 + 1
    else:
        assert together[0].total_visual != together[1].total_visual
    assert [r.answer for r in together] == [r.answer for r in alone]
    assert [r.kept_visual for r in together] == [r.kept_visual for r in alone]
    assert all(r.fallback is None for r in together + alone)


UNITS = {"qwen_vl": 4, "llava": 8, "internvl": 8}  # of an 8-frame clip: temporal patches or frames


def test_frame_skipping_at_k0_changes_nothing_but_the_frames_encoded(pair):
    """K = 0: frames (InternVL, LLaVA-OneVision) or 2-frame temporal patches (Qwen) holding no
    kept token are not encoded; answers equal the run without skipping, FLOPs are lower."""
    guide, large = pair
    samples = [Sample("t", 0, clip_prompt(CLIP_32))]
    base = {"prune_layer": 0.0, "keep_ratio": 0.05}
    skipped = SGLPipeline(large, guide, SGLSettings(**base)).generate(samples, GEN)[0]
    full = SGLPipeline(large, guide, SGLSettings(**base, skip_units=False)).generate(samples, GEN)[0]
    assert skipped.answer == full.answer and skipped.kept_visual == full.kept_visual
    units = UNITS[large.family.name]
    assert skipped.vision_units == units and skipped.vision_units_encoded < units
    assert full.vision_units_encoded == units and skipped.flops < full.flops


def test_frame_skipping_logits_equal_and_only_needed_frames_reach_the_tower(pair):
    """The oracle under the pipeline test: at K = 0, the pruned large model's logits with the
    unit hooks equal those without (every unit encoded), and a spy on the vision tower's input
    sees exactly the rows (and, for Qwen, the ``(1, h, w)`` grid rows) of the needed units."""
    _, large = pair
    prompts = [clip_prompt(CLIP_48)]
    inputs = large.family.build_batch(large, prompts)
    visual = large.visual_mask(inputs["input_ids"])
    # the earliest visual tokens win: the first units are needed, the last ones not
    earliest = [-torch.arange(int(visual[0].sum()), dtype=torch.float32)]
    plan = plan_from_scores(earliest, visual, inputs["attention_mask"], 0.05)
    (units,) = large.family.visual_units(large, inputs, prompts)
    needed = units_to_encode(units, kept_visual_mask(plan.index[0], plan.valid[0], visual[0]))
    assert units.count == UNITS[large.family.name] and 0 < int(needed.sum()) < units.count
    tower = large.family.vision_tower(large.model)
    hooks = large.family.unit_skip_hooks(list(units.rows), needed.tolist())
    seen = []

    def spy(module, args, kwargs):
        given = kwargs[hooks.input_name] if hooks.input_name in kwargs else args[0]
        seen.append((given.shape[0], kwargs.get("grid_thw")))

    pruner = VisualTokenPruner(large.text_model, 0)
    with pruner.installed(), torch.no_grad():
        pruner.arm(plan)
        full = large.model(**inputs).logits
        handle = None
        with hooks.installed(*large.family.vision_modules(large.model)):
            handle = tower.register_forward_pre_hook(spy, with_kwargs=True)  # after the selecting hook
            pruner.arm(plan)
            skipped = large.model(**inputs).logits
        handle.remove()
    torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-5)
    rows = sum(r for r, on in zip(units.rows, needed.tolist(), strict=True) if on)
    assert [count for count, _ in seen] == [rows]
    if large.family.name == "qwen_vl":
        grids = seen[0][1]
        assert len(grids) == int(needed.sum()) and (grids[:, 0] == 1).all()


def test_video_flops_match_flop_counter(pair):
    """Vision tower + text prefill of a clip, analytic against ``torch.utils.flop_counter``."""
    _, large = pair
    loaded = large.family.load(large.path, text_attention="eager", **LOAD)
    loaded.model.set_attn_implementation("eager")  # CPU SDPA is invisible to the flop counter
    prompts = [clip_prompt(CLIP_32)]
    inputs = loaded.family.build_batch(loaded, prompts)
    from lmms_sgl.pipeline import accounting

    n_visual = loaded.visual_mask(inputs["input_ids"]).sum(1).tolist()
    vision = accounting.vision_cost(loaded, inputs, prompts, n_visual)
    with FlopCounterMode(display=False) as whole, torch.no_grad():
        loaded.model(**inputs)
    length = inputs["input_ids"].shape[1]
    analytic = vision[0] + cost.prefill_flops(loaded.text_shape, length, logits=length)
    assert analytic == pytest.approx(whole.get_total_flops(), rel=0.01)


# -- large_only equals lmms-eval's own video models -------------------------------------------------
def test_large_only_answers_equal_lmms_eval_qwen2_5_vl(models_dir):
    """lmms-eval's chat ``qwen2_5_vl`` (what ``--model qwen2_5_vl`` resolves to) fed the request
    lmms-eval builds for a video task (the path, then the text), 32 frames by default."""
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL

    path = str(models_dir / "qwen2.5-vl-large")
    theirs = Qwen2_5_VL(pretrained=path, device="cpu", device_map="cpu", **PIXELS)
    docs = [{"video": str(CLIP_32), "question": "Which way does the square move?"}]
    theirs.task_dict = {"t": {"test": docs}}
    content = [{"type": "video", "url": docs[0]["video"]}, {"type": "text", "text": docs[0]["question"]}]
    gen = {"max_new_tokens": 6, "until": ["\n\n"]}
    request = Instance(
        "generate_until",
        (docs[0]["question"], lambda d: [{"role": "user", "content": content}], dict(gen), 0, "t", "test"),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    expected = [a.text if isinstance(a, GenerationResult) else a for a in theirs.generate_until([request])]
    family = QwenVLFamily(**PIXELS)  # num_frames 32, the default
    large = family.load(path, dtype=theirs.model.dtype, device_map="cpu", text_attention="sdpa")
    ours = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(
        [Sample("t", 0, clip_prompt(CLIP_32, docs[0]["question"]))], GenerationSettings.from_gen_kwargs(gen)
    )
    assert [r.answer for r in ours] == expected and expected[0]


def test_large_only_answers_equal_lmms_eval_internvl_hf(models_dir, monkeypatch):
    """lmms-eval's chat ``internvl_hf`` (num_frames=32: transformers' own ``sample_frames``). Its
    processor decodes the path with torchcodec, which the pinned torch cannot take; the test routes
    that loader to transformers' decord backend, the decoder ``sgl_internvl2`` uses."""
    import transformers.video_processing_utils as video_processing
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.models.chat.internvl_hf import InternVLHf

    def fetch_with_decord(self, url, sample_indices_fn=None):
        from transformers.video_utils import load_video

        if isinstance(url, list):
            return list(zip(*[fetch_with_decord(self, u, sample_indices_fn) for u in url], strict=True))
        return load_video(url, backend="decord", sample_indices_fn=sample_indices_fn)

    monkeypatch.setattr(video_processing.BaseVideoProcessor, "fetch_videos", fetch_with_decord)
    path = str(models_dir / "internvl-large")
    theirs = InternVLHf(pretrained=path, device="cpu", device_map="cpu")
    question = "Which way does the square move?"
    theirs.task_dict = {"t": {"test": [{}]}}
    content = [{"type": "video", "url": str(CLIP_48)}, {"type": "text", "text": question}]
    gen = {"max_new_tokens": 6, "until": ["\n\n"]}
    request = Instance(
        "generate_until",
        (question, lambda d: [{"role": "user", "content": content}], dict(gen), 0, "t", "test"),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    expected = [a.text if isinstance(a, GenerationResult) else a for a in theirs.generate_until([request])]
    large = InternVLFamily().load(path, dtype=theirs.model.dtype, device_map="cpu", text_attention="sdpa")
    ours = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(
        [Sample("t", 0, clip_prompt(CLIP_48, question))], GenerationSettings.from_gen_kwargs(gen)
    )
    assert [r.answer for r in ours] == expected and expected[0]


def test_large_only_answers_equal_lmms_eval_llava_hf(models_dir):
    """lmms-eval's ``llava_hf`` (its video path: 32 frames at ``np.linspace`` indices read with decord,
    ``"<video>\\n"`` before the question, the processor's ``videos=``) on the OneVision video pair."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.simple.llava_hf import LlavaHf

    path = str(models_dir / "llava-ov-video-large")
    theirs = LlavaHf(pretrained=path, device="cpu", device_map="cpu", dtype="float32")
    question = "Which way does the square move?"
    theirs.task_dict = {"t": {"test": [{}]}}
    gen = {"max_new_tokens": 6, "until": ["\n\n"]}
    request = Instance(
        "generate_until",
        (question, dict(gen), lambda d: [str(CLIP_48)], 0, "t", "test"),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    expected = theirs.generate_until([request])
    large = LlavaFamily().load(path, dtype=torch.float32, device_map="cpu", text_attention="sdpa")
    ours = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(
        [Sample("t", 0, clip_prompt(CLIP_48, question))], GenerationSettings.from_gen_kwargs(gen)
    )
    assert [r.answer for r in ours] == expected and expected[0]


# -- bad input -------------------------------------------------------------------------------------
def test_unreadable_empty_and_missing_videos_are_clear_errors(tmp_path):
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 10)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"video '.*missing.mp4' does not exist"):
        open_video(str(tmp_path / "missing.mp4"))
    for name in ("garbage.mp4", "empty.mp4"):
        with pytest.raises(VideoError, match=rf"video '.*{name}' cannot be decoded"):
            open_video(str(tmp_path / name))
    assert open_video(str(CLIP_48)).total_frames == 48


def test_num_frames_is_validated_and_defaults_to_lmms_eval_s_32():
    assert parse_model_args(pretrained="x", method="large_only").num_frames == 32
    assert parse_model_args(pretrained="x", method="large_only", num_frames="8").num_frames == 8
    for bad in ("0", "-3", "2.5", "many"):
        with pytest.raises(ValueError, match=rf"num_frames='?{re.escape(bad)}'?"):
            parse_model_args(pretrained="x", method="large_only", num_frames=bad)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("llava-ov-large", "its tokenizer has no video token matching video_token_id"),
        ("llava-large", "is a 'llava' checkpoint; sgl_llava takes videos with LLaVA-OneVision"),
    ],
)
def test_video_for_a_checkpoint_without_video_support_is_refused(models_dir, name, reason):
    """A OneVision checkpoint whose tokenizer lacks the video token, and LLaVA-1.5."""
    large = LlavaFamily().load(str(models_dir / name), text_attention="sdpa", **LOAD)
    with pytest.raises(ValueError, match=reason):
        large.family.build_batch(large, [clip_prompt(CLIP_32)])


STOCK_RUNS = {
    "llava-ov-video": ("sgl_llava", ""),
    "qwen2.5-vl": ("sgl_qwen2_vl", f",min_pixels={PIXELS['min_pixels']},max_pixels={PIXELS['max_pixels']}"),
    "internvl": ("sgl_internvl2", ""),
}


def stock_video_run(models_dir, tasks_dir, name: str) -> None:
    """lmms-eval's evaluator (as its CLI runs it) on ``sgl_video``: SGL at K = 0 with frame
    skipping, 4 frames per clip, 2 clips; every answer non-empty, none failed."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    model, extra = STOCK_RUNS[name]
    args = (
        f"pretrained={models_dir / f'{name}-large'},guide={models_dir / f'{name}-guide'},"
        f"prune_layer=0,keep_ratio=0.1,num_frames=4{extra}"
    )
    out = simple_evaluate(
        model=model,
        model_args=args,
        tasks=["sgl_video"],
        limit=2,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
    )
    rows = out["samples"]["sgl_video"]
    assert len(rows) == 2 and all(row["resps"][0][0] for row in rows), model
    assert "exact_match,none" in out["results"]["sgl_video"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava-ov-video", "qwen2.5-vl", "internvl"])
def test_stock_evaluator_runs_the_local_video_task(models_dir, tasks_dir, name):
    """The stock evaluator's video path (request parsing, probing, the SGL model) on every family
    (a few seconds each on an idle machine)."""
    stock_video_run(models_dir, tasks_dir, name)
