"""``sgl_qwen2_vl`` on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL pairs: multimodal RoPE after pruning,
deepstack, dynamic resolution, importance, vision FLOPs, and answers equal to lmms-eval's models."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from lmms_sgl.families import Prompt, QwenVLFamily
from lmms_sgl.method import cost
from lmms_sgl.method.guide import consistency_pass, run_guide
from lmms_sgl.method.importance import ATTENTION_NAME, AttentionRecorder, prompt_rows_from_last_visual
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores, random_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline
from tests.helpers import assert_mass_equals_output_attentions, kept_visual_sets

ARCHS = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}
LOAD = {"dtype": torch.float32, "device_map": "cpu"}
GEN = GenerationSettings.from_gen_kwargs({"max_new_tokens": 4, "until": ["\n\n"]})
# Small images keep the tests fast: 4 to about 16 visual tokens per image (factor 28 or 32).
MIN_PIXELS, MAX_PIXELS = 4 * 32 * 32, 16 * 32 * 32


@pytest.fixture(scope="module", params=sorted(ARCHS))
def pair(request, models_dir):
    """(guide with the recording attention, large with SDPA, large with eager) of one architecture."""
    family = QwenVLFamily(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    name = ARCHS[request.param]
    guide = family.load(str(models_dir / f"{name}-guide"), text_attention=ATTENTION_NAME, **LOAD)
    large = family.load(str(models_dir / f"{name}-large"), text_attention="sdpa", **LOAD)
    return guide, large


def prompts() -> list[Prompt]:
    """Images of different sizes, so different visual-token counts (and a text-only prompt)."""
    return [
        Prompt("What color is the circle?", [Image.new("RGB", (800, 500), (200, 20, 20))]),
        Prompt("Is it?", [Image.new("RGB", (448, 448), (20, 20, 200))]),
        Prompt(
            "Which is brighter?",
            [Image.new("RGB", (300, 300), "white"), Image.new("RGB", (200, 700), "gray")],
        ),
        Prompt("A question without any image?", []),
    ]


def samples() -> list[Sample]:
    return [Sample("t", i, p) for i, p in enumerate(prompts())]


# -- pruning: logits equal an independent reference ----------------------------------------------
def reference_logits(loaded, inputs: dict, keep: torch.Tensor, layer_k: int, generated: torch.Tensor):
    """Logits of prompt + ``generated`` without the pruner, cache or ``rope_deltas``: the unpruned
    model gives layer K's input on the whole sequence; layers K.. run by hand over the kept prompt
    rows and the generated rows, with cos/sin from the 3-D positions ``get_rope_index`` computes
    for the whole sequence, gathered; deepstack features added at the kept visual rows."""
    model, text = loaded.model, loaded.text_model
    length = inputs["input_ids"].shape[1]
    sequence = torch.cat([inputs["input_ids"], generated], dim=1)
    types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(generated)], dim=1)
    mask = torch.ones_like(sequence)
    positions, _ = model.model.get_rope_index(
        sequence, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask, mm_token_type_ids=types
    )
    seen: dict = {}

    def layer_input(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]

    def text_inputs(module, args, kwargs):
        seen["visual"], seen["deepstack"] = (
            kwargs.get("visual_pos_masks"),
            kwargs.get("deepstack_visual_embeds"),
        )

    handles = [
        text.layers[layer_k].register_forward_pre_hook(layer_input, with_kwargs=True),
        text.register_forward_pre_hook(text_inputs, with_kwargs=True),
    ]
    try:
        model(
            input_ids=sequence,
            attention_mask=mask,
            mm_token_type_ids=types,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            use_cache=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    rows = torch.cat([keep, torch.arange(length, sequence.shape[1])])
    hidden = seen["hidden"][:, rows]
    cos, sin = text.rotary_emb(hidden, positions[:, :, rows])
    deepstack = seen["deepstack"] or []
    if deepstack:
        visual = seen["visual"][0]
        feature_row = visual.long().cumsum(0) - 1
        kept_visual = [(j, int(feature_row[p])) for j, p in enumerate(rows.tolist()) if visual[p]]
    for index in range(layer_k, len(text.layers)):
        hidden = text.layers[index](hidden, attention_mask=None, position_embeddings=(cos, sin))
        if index < len(deepstack):
            hidden = hidden.clone()
            for j, feature in kept_visual:
                hidden[0, j] += deepstack[index][feature]
    return model.lm_head(text.norm(hidden))


@pytest.mark.parametrize("layer_k", [0, 1])
def test_pruned_logits_equal_the_gathered_3d_reference(pair, layer_k):
    """Prefill and every decode step; K = 0 and 1 fall inside Qwen3-VL's deepstack layers (0, 1):
    at K = 1 the model adds layer 0's features on the full sequence, the pruner layer 1's."""
    _, large = pair
    inputs = large.family.build_batch(large, prompts()[:1])
    visual = inputs["input_ids"] == large.image_token_id
    plan = plan_from_scores(random_scores(visual, layer_k), visual, inputs["attention_mask"], 0.3)
    keep = plan.index[0]
    steps = 5
    pruner = VisualTokenPruner(large.text_model, layer_k)
    with pruner.installed(), torch.no_grad():
        pruner.arm(plan)
        prefill = large.model(**inputs).logits[0]
        pruner.arm(plan)
        out = large.model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        reference = reference_logits(large, inputs, keep, layer_k, out.sequences[:, length:-1])[0]
    kept = len(keep)
    assert (prefill - reference[:kept]).abs().max() <= 1e-5
    for step in range(steps):  # step s is predicted at the row before generated token s
        assert (out.logits[step][0] - reference[kept - 1 + step]).abs().max() <= 1e-5, step
    with torch.no_grad():
        unpruned = large.model(**inputs).logits[0, -1]
    assert (unpruned - prefill[-1]).abs().max() > 1e-3, "pruning must change the output"


def test_keep_ratio_one_equals_the_unpruned_model(pair):
    _, large = pair
    inputs = large.family.build_batch(large, prompts()[:3])
    visual = inputs["input_ids"] == large.image_token_id
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    kwargs |= {"output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        base = large.model.generate(**inputs, **kwargs)
        pruner = VisualTokenPruner(large.text_model, 1)
        with pruner.installed():
            pruner.arm(plan_from_scores([None] * 3, visual, inputs["attention_mask"], 1.0))
            same = large.model.generate(**inputs, **kwargs)
    assert torch.equal(same.sequences, base.sequences)
    for a, b in zip(same.logits, base.logits, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_batch_of_different_sizes_equals_each_alone(pair, monkeypatch):
    """Keep sets, answers and exit scores; K = 1 of 4 (inside Qwen3-VL's deepstack layers)."""
    guide, large = pair
    kept = kept_visual_sets(monkeypatch)
    settings = SGLSettings(method="sgl", prune_layer=0.25, keep_ratio=0.2, record_exit_score=True)
    pipeline = SGLPipeline(large, guide, settings)
    together = pipeline.generate(samples(), GEN)
    kept_together = list(kept)
    kept.clear()
    one_by_one = [pipeline.generate([s], GEN)[0] for s in samples()]
    counts = [r.total_visual for r in together]
    assert len(set(counts[:3])) == 3, f"images of different sizes give different token counts: {counts}"
    assert [r.answer for r in together] == [r.answer for r in one_by_one]
    assert kept_together == kept and all(kept[:3]) and not kept[3]
    for a, b in zip(together, one_by_one, strict=True):
        assert a.fallback is None and a.kept_visual == b.kept_visual
        assert a.consistency == pytest.approx(b.consistency, rel=1e-4, abs=1e-6)


def test_consistency_pass_keeps_3d_positions_and_deepstack(pair):
    """Ratio 1 keeps every visual token: S_cons must then be the unpruned teacher-forced
    probability of the answer, computed by the model itself from ``input_ids`` and pixels."""
    guide, _ = pair
    inputs = guide.family.build_batch(guide, prompts()[:1])
    visual = inputs["input_ids"] == guide.image_token_id
    run = run_guide(guide.model, guide.text_model, inputs, visual, 4, [-1])
    ours = consistency_pass(guide.model, guide.text_model, run, 1.0)
    answer = run.generated[:, : int(run.lengths[0])]
    sequence = torch.cat([inputs["input_ids"], answer], dim=1)
    with torch.no_grad():
        logits = guide.model(
            input_ids=sequence,
            attention_mask=torch.ones_like(sequence),
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], dim=1),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
    length = inputs["input_ids"].shape[1]
    logprobs = torch.log_softmax(logits[0, length - 1 : -1].float(), dim=-1)
    expected = logprobs.gather(1, answer[0, :, None]).sum()  # S_cons is the raw product
    assert float(ours[0].double().log()) == pytest.approx(float(expected), abs=1e-4)


def test_guide_with_other_pixel_bounds_is_mapped_by_geometry(models_dir):
    """Different bounds give the guide other token counts: its importance is mapped onto the large
    model's merged patches by their boxes (the whole image resized, no crop), not a fallback."""
    path = str(models_dir / "qwen2.5-vl-{}")
    guide = QwenVLFamily(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).load(
        path.format("guide"), text_attention=ATTENTION_NAME, **LOAD
    )
    large = QwenVLFamily(min_pixels=MIN_PIXELS, max_pixels=2 * MAX_PIXELS).load(
        path.format("large"), text_attention="sdpa", **LOAD
    )
    settings = SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.2)
    record = SGLPipeline(large, guide, settings).generate(samples()[:1], GEN)[0]
    assert record.fallback is None and record.extra["transfer"] == "geometric"
    assert record.kept_visual < record.total_visual
    assert record.extra["guide_layout"] != record.extra["large_layout"]


# -- importance, FLOPs ------------------------------------------------------------------------------
def test_importance_equals_output_attentions(pair):
    guide, _ = pair
    eager = QwenVLFamily().load(guide.path, text_attention="eager", **LOAD).model
    inputs = guide.family.build_batch(guide, prompts()[:2])
    visual = inputs["input_ids"] == guide.image_token_id
    rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"])
    steps = 4
    recorder = AttentionRecorder(rows)
    kwargs = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    with recorder.active(), torch.no_grad():
        sequences = guide.model.generate(**inputs, **kwargs)
    mass = recorder.finalize([steps - 1] * 2)
    assert_mass_equals_output_attentions(mass, sequences, eager, inputs, kwargs, rows, visual, steps)


def test_vision_flops_match_flop_counter(pair):
    """Each tower (Qwen2.5-VL's window attention, Qwen3-VL's deepstack mergers) and the text prefill."""
    _, large = pair
    loaded = QwenVLFamily(min_pixels=MIN_PIXELS, max_pixels=40 * 28 * 28).load(
        large.path, text_attention="eager", **LOAD
    )
    loaded.model.set_attn_implementation("eager")  # CPU SDPA is invisible to the flop counter
    batch = [
        Prompt("What?", [Image.new("RGB", (300, 120), "red")]),
        Prompt("Two?", [Image.new("RGB", (90, 90), "blue"), Image.new("RGB", (500, 250), "green")]),
    ]
    inputs = loaded.family.build_batch(loaded, batch)
    n_visual = (inputs["input_ids"] == loaded.image_token_id).sum(1).tolist()
    vision = loaded.family.vision_flops(loaded, inputs, [1, 2], n_visual)
    with FlopCounterMode(display=False) as whole, torch.no_grad():
        loaded.model(**inputs)
    length = inputs["input_ids"].shape[1]
    analytic = sum(vision) + 2 * cost.prefill_flops(loaded.text_shape, length, logits=length)
    assert analytic == pytest.approx(whole.get_total_flops(), rel=0.01)


# -- arguments ----------------------------------------------------------------------------------------
def test_pixel_bounds_reach_both_processors_and_are_validated(models_dir):
    from lmms_sgl.lmms.args import parse_model_args

    family = QwenVLFamily(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 16)
    for role in ("guide", "large"):
        loaded = family.load(str(models_dir / f"qwen2.5-vl-{role}"), text_attention="sdpa", **LOAD)
        assert family.pixel_bounds(loaded) == (28 * 28 * 8, 28 * 28 * 16)
        inputs = family.build_batch(loaded, prompts()[:1])
        assert int((inputs["input_ids"] == loaded.image_token_id).sum()) <= 16
    args = parse_model_args(pretrained="x", method="large_only", min_pixels="3136", max_pixels=50176.0)
    assert (args.min_pixels, args.max_pixels) == (3136, 50176)
    with pytest.raises(ValueError, match=r"min_pixels=9000 must be <= max_pixels=3136"):
        parse_model_args(pretrained="x", method="large_only", min_pixels=9000, max_pixels=3136)
    with pytest.raises(ValueError, match=r"max_pixels=0 must be >= 1"):
        parse_model_args(pretrained="x", method="large_only", max_pixels=0)
    with pytest.raises(ValueError, match=r"max_pixels='many' must be a whole number"):
        parse_model_args(pretrained="x", method="large_only", max_pixels="many")
    with pytest.raises(ValueError, match=r"max_tiles=6: the qwen_vl family has no tiles"):
        QwenVLFamily(max_tiles=6)


def test_other_models_refuse_pixel_bounds_and_the_entry_point_resolves(models_dir):
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from lmms_sgl.lmms.sgl_llava import SGLLlava

    assert MODEL_REGISTRY_V2.resolve("sgl_qwen2_vl").model_type == "chat"  # the default
    assert get_model("sgl_qwen2_vl").__name__ == "SGLQwen2VLChat"
    assert MODEL_REGISTRY_V2.resolve("sgl_qwen2_vl", force_simple=True).model_type == "simple"
    assert get_model("sgl_qwen2_vl", force_simple=True).__name__ == "SGLQwen2VL"
    with pytest.raises(ValueError, match=r"max_pixels=50176 sets Qwen-VL's dynamic resolution; SGLLlava"):
        SGLLlava(pretrained=str(models_dir / "llava-large"), method="large_only", max_pixels=50176)
    from lmms_sgl.families.base import CheckpointError

    with pytest.raises(CheckpointError, match=r"is a 'llava' checkpoint; the qwen_vl family serves"):
        QwenVLFamily().check_checkpoint(str(models_dir / "llava-large"), "pretrained")


@pytest.mark.parametrize(("arch", "minimum"), [("qwen2_vl", 784), ("qwen2_5_vl", 784), ("qwen3_vl", 1024)])
def test_pixel_bounds_below_one_merged_patch_are_refused_before_loading(
    models_dir, monkeypatch, arch, minimum
):
    """(patch x merge)^2 pixels is one visual token: a max_pixels below it made every image a single
    token, silently. Refused before any weights load, naming the argument, value and minimum."""
    from lmms_sgl.lmms.sgl_qwen2_vl import SGLQwen2VL

    def loaded(*args, **kwargs):
        raise AssertionError("weights loaded although the pixel bounds are invalid")

    monkeypatch.setattr(QwenVLFamily, "load", loaded)
    large, guide = (str(models_dir / f"{ARCHS[arch]}-{role}") for role in ("large", "guide"))
    side = int(minimum**0.5)
    for bounds, name, value in [
        ({"min_pixels": 1, "max_pixels": 1}, "min_pixels", 1),
        ({"max_pixels": minimum - 1}, "max_pixels", minimum - 1),
        ({"min_pixels": 16, "max_pixels": 50176}, "min_pixels", 16),
    ]:
        with pytest.raises(
            ValueError,
            match=rf"{name}={value} is below one merged patch of pretrained='.*': "
            rf"{side} x {side} = {minimum} pixels .*allowed: {name} >= {minimum}",
        ):
            SGLQwen2VL(pretrained=large, guide=guide, prune_layer=0.5, **bounds)
    family = QwenVLFamily(min_pixels=minimum, max_pixels=minimum)
    assert family.check_checkpoint(large, "pretrained") > 0 and family.check_checkpoint(guide, "guide") > 0
    with pytest.raises(ValueError, match=rf"max_pixels={minimum - 1} is below one merged patch"):
        QwenVLFamily(max_pixels=minimum - 1).load_processor(large)


# -- large_only answers equal lmms-eval's own models ------------------------------------------------
LMMS_EVAL_MODELS = {  # architecture -> (module, class, the dtype it loads with)
    "qwen2_vl": ("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL", "float32"),  # torch_dtype="auto"
    "qwen2_5_vl": ("lmms_eval.models.chat.qwen2_5_vl", "Qwen2_5_VL", "bfloat16"),
    "qwen3_vl": ("lmms_eval.models.chat.qwen3_vl", "Qwen3_VL", "bfloat16"),
}


def lmms_eval_answers(arch: str, path: str, docs: list[dict], gen: dict, pixels: dict) -> list[str]:
    """Answers of lmms-eval's model for ``arch`` (what ``--model qwen2_vl`` etc. resolve to), fed
    the requests lmms-eval builds: ``doc_to_visual`` for the simple model, ``doc_to_messages``
    (images, then the text) for the chat models."""
    import importlib

    from lmms_eval.api.instance import GenerationResult, Instance

    module, name, _ = LMMS_EVAL_MODELS[arch]
    model = getattr(importlib.import_module(module), name)(
        pretrained=path, device="cpu", device_map="cpu", **pixels
    )
    model.task_dict = {"t": {"test": docs}}
    requests = []
    for i, doc in enumerate(docs):
        if arch == "qwen2_vl":
            arguments = (doc["question"], dict(gen), lambda d: [d["image"]], i, "t", "test")
        else:
            content = [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}]
            arguments = (doc["question"], lambda d, c=content: [{"role": "user", "content": c}], dict(gen), i)
            arguments += ("t", "test")
        requests.append(Instance("generate_until", arguments, i, {"task": "t", "doc_id": i, "repeats": 1}))
    answers = model.generate_until(requests)
    return [a.text if isinstance(a, GenerationResult) else a for a in answers]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_large_only_answers_equal_lmms_eval_models(models_dir, arch):
    """Image sizes already on both grids (224 = 8 x 28 = 7 x 32) and inside the pixel bounds, so
    that no resampling happens on either side (lmms-eval's chat models resize with qwen_vl_utils'
    defaults first, its ``qwen2_vl`` re-encodes every image as JPEG, which moves a solid colour by
    one level only)."""
    pixels = {"min_pixels": 4 * 32 * 32, "max_pixels": 448 * 224}
    docs = [{"question": "What color is it?", "image": Image.new("RGB", (448, 224), (200, 20, 20))}]
    gen = {"max_new_tokens": 6, "until": ["\n\n"]}
    path = str(models_dir / f"{ARCHS[arch]}-large")
    expected = lmms_eval_answers(arch, path, docs, gen, pixels)
    family = QwenVLFamily(**pixels)
    dtype = getattr(torch, LMMS_EVAL_MODELS[arch][2])
    large = family.load(path, dtype=dtype, device_map="cpu", text_attention="sdpa")
    ours = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(
        [Sample("t", i, Prompt(d["question"], [d["image"]])) for i, d in enumerate(docs)],
        GenerationSettings.from_gen_kwargs(gen),
    )

    def cut(answer: str) -> str:  # lmms-eval's qwen2_vl cuts at every `until` and strips
        return answer.split("\n\n")[0].strip()

    assert [cut(r.answer) for r in ours] == [cut(a) for a in expected]
    assert all(cut(a) for a in expected), "the comparison needs non-empty answers"


def test_lmms_eval_qwen2_vl_re_encodes_every_image_as_jpeg_and_the_docs_say_so():
    """lmms-eval's ``qwen2_vl`` sends every PIL image through JPEG (quality 85), also one whose size
    needs no resampling, so its pixels differ from the image's; docs/qwen-vl.md must not restrict that
    to resampled images."""
    import base64
    import io
    from pathlib import Path

    from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

    noise = torch.randint(
        0, 256, (224, 448, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    image = Image.fromarray(noise.numpy())  # 448 x 224: on the 28 and 32 grids, no resampling
    url = Qwen2_VL._encode_image_data_url(None, image)  # the method uses nothing of the instance
    assert url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    assert decoded.size == image.size
    changed = (torch.tensor(list(decoded.getdata())) != torch.tensor(list(image.getdata()))).any(1)
    assert changed.float().mean() > 0.5, "JPEG changes most pixels of a textured image"
    page = " ".join((Path(__file__).resolve().parent.parent / "docs" / "qwen-vl.md").read_text().split())
    assert "for Qwen2-VL every image is re-encoded as JPEG at quality 85" in page
    assert "`qwen2_vl`, `qwen2_5_vl` and `qwen3_vl` on images whose size needs no resampling" not in page


# -- end to end through lmms-eval -------------------------------------------------------------------
def test_sgl_qwen2_vl_end_to_end(models_dir, tasks_dir):
    """lmms-eval's evaluator in this process (as its CLI runs it; only our task folder indexed, which
    saves indexing lmms-eval's hundreds of task files): generation and multiple choice,
    Qwen2.5-VL guiding Qwen2.5-VL; the log-likelihood path extends Qwen's ``mm_token_type_ids``."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    args = (
        f"pretrained={models_dir / 'qwen2.5-vl-large'},guide={models_dir / 'qwen2.5-vl-guide'},"
        f"prune_layer=0.5,keep_ratio=0.2,min_pixels={MIN_PIXELS},max_pixels={MAX_PIXELS}"
    )
    out = simple_evaluate(
        model="sgl_qwen2_vl",
        model_args=args,
        tasks=["sgl_smoke", "sgl_smoke_mc"],
        force_simple=True,  # multiple choice reaches simple models only (README)
        limit=1,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager("WARNING", include_path=str(tasks_dir), include_defaults=False),
        verbosity="WARNING",
    )
    assert "exact_match,none" in out["results"]["sgl_smoke"] and "acc,none" in out["results"]["sgl_smoke_mc"]
    records = {
        task: [entry["sgl"] for row in out["samples"][task] for entry in row["token_counts"]]
        for task in ("sgl_smoke", "sgl_smoke_mc")
    }
    assert len(records["sgl_smoke"]) == 1 and len(records["sgl_smoke_mc"]) == 6  # one per choice
    for record in records["sgl_smoke"] + records["sgl_smoke_mc"]:
        assert record["fallback"] is None and record["reached_large"] and record["layer_k"] == 2
        assert record["kept_visual"] == max(1, int(record["total_visual"] * 0.2)) < record["total_visual"]
        assert record["flops"] > 0 and record["guide_seconds"] > 0
