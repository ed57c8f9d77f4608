"""Cost model: paper token ratios, analytic FLOPs against torch.utils.flop_counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmms_sgl.method import cost
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores, random_scores
from lmms_sgl.method.settings import SGLSettings
from tests.helpers import batch, greedy, load


@pytest.mark.parametrize("layer_k,keep,expected", [(19, 0.4, 0.6375), (9, 0.2, 0.35), (2, 0.05, 0.0896)])
def test_token_ratio_reproduces_the_paper_on_48_layers(layer_k, keep, expected):
    assert cost.token_ratio(layer_k, 48, keep) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("preset,label", [(0.64, 0.64), (0.35, 0.35), (0.09, 0.09)])
def test_presets_map_to_the_paper_settings_on_26b(preset, label):
    settings = SGLSettings.from_token_ratio(preset)
    assert settings.expected_token_ratio(48) == pytest.approx(label, abs=0.005)


def text_flops(counter: FlopCounterMode) -> int:
    """FLOPs of the text model and LM head only (the vision tower is counted elsewhere)."""
    counts = counter.get_flop_counts()
    return sum(
        sum(by_op.values())
        for name, by_op in counts.items()
        if name.endswith("model.language_model") or name.endswith("lm_head")
    )


@pytest.fixture(scope="module", params=["internvl", "llava"])
def eager_large(request, models_dir):
    return load(models_dir / f"{request.param}-large", "eager")


def test_generation_flops_match_flop_counter(eager_large):
    model, processor = eager_large
    inputs = batch(processor, (0,))
    shape = cost.TransformerShape.from_text_config(model.config.text_config)
    steps = 6
    with FlopCounterMode(display=False) as counter:
        greedy(model, inputs, steps)
    analytic = cost.generation_flops(shape, inputs.input_ids.shape[1], steps)
    assert analytic == pytest.approx(text_flops(counter), rel=0.05)


def test_pruned_generation_flops_match_flop_counter(eager_large):
    model, processor = eager_large
    inputs = batch(processor, (0,))
    vis = inputs.input_ids == model.config.image_token_id
    shape = cost.TransformerShape.from_text_config(model.config.text_config)
    plan = plan_from_scores(random_scores(vis, 0), vis, inputs.attention_mask, 0.1)
    pruner = VisualTokenPruner(model.model.language_model, 2)
    steps = 5
    with pruner.installed(), FlopCounterMode(display=False) as counter:
        pruner.arm(plan)
        greedy(model, inputs, steps)
    analytic = cost.generation_flops(shape, inputs.input_ids.shape[1], steps, 2, plan.pruned_length)
    unpruned = cost.generation_flops(shape, inputs.input_ids.shape[1], steps)
    assert analytic < 0.8 * unpruned
    assert analytic == pytest.approx(text_flops(counter), rel=0.05)


def test_vision_tower_flops_match_flop_counter(eager_large):
    model, processor = eager_large
    inputs = batch(processor, (0,))
    vision = model.config.vision_config
    shape = cost.TransformerShape.from_vision_config(vision)
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patches = (size // patch) ** 2
    tokens = patches + 1  # the class token
    images = inputs.pixel_values.shape[0]
    with FlopCounterMode(display=False) as counter:
        model.model.vision_tower(pixel_values=inputs.pixel_values)
    analytic = images * cost.vit_flops(shape, tokens, patch, patches)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_consistency_pass_flops_match_flop_counter(models_dir):
    from lmms_sgl.method.guide import consistency_pass, run_guide
    from lmms_sgl.method.selection import keep_count

    model, processor = load(models_dir / "internvl-guide", "eager")
    inputs = batch(processor, (0,))
    vis = inputs.input_ids == model.config.image_token_id
    text_model = model.model.language_model
    run = run_guide(model, text_model, inputs, vis, 4, [processor.tokenizer.eos_token_id])
    shape = cost.TransformerShape.from_text_config(model.config.text_config)
    with FlopCounterMode(display=False) as counter:
        consistency_pass(model, text_model, run, 0.05)
    n_visual, length = int(vis.sum()), int(run.lengths[0])
    kept = inputs.input_ids.shape[1] - n_visual + keep_count(n_visual, 0.05) + length
    assert cost.prefill_flops(shape, kept, logits=kept) == pytest.approx(text_flops(counter), rel=0.05)


@pytest.mark.parametrize(
    "family,name", [("internvl", "internvl-large"), ("llava", "llava-large"), ("llava", "llava-ov-large")]
)
def test_family_vision_and_text_flops_match_flop_counter(models_dir, family, name):
    """Vision tower + projector (per family, any-resolution crops included) + text prefill."""
    from PIL import Image

    from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt

    adapter = (InternVLFamily if family == "internvl" else LlavaFamily)(max_tiles=6)
    loaded = adapter.load(
        str(models_dir / name), dtype=torch.float32, device_map="cpu", text_attention="eager"
    )
    loaded.model.set_attn_implementation("eager")  # CPU SDPA is invisible to the flop counter
    prompts = [
        Prompt("What?", [Image.new("RGB", (300, 120), "red")]),
        Prompt("Two?", [Image.new("RGB", (90, 90), "blue"), Image.new("RGB", (100, 250), "green")]),
    ]
    inputs = adapter.build_batch(loaded, prompts)
    n_visual = (inputs["input_ids"] == loaded.image_token_id).sum(1).tolist()
    vision = adapter.vision_flops(loaded, inputs, [1, 2], n_visual)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        loaded.model(**inputs)
    length = inputs["input_ids"].shape[1]  # both rows run at the padded length
    analytic = sum(vision) + 2 * cost.prefill_flops(loaded.text_shape, length, logits=length)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.05)
