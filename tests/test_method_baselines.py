"""DivPrune, VisionZip and PDrop: each keep set equals a straightforward reference of its rule, alone
and in a batch; the no-op setting equals the unpruned model; bad input fails before loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmms_sgl.baselines.divprune import InputEmbeddingTap, divprune_plan_source
from lmms_sgl.baselines.pdrop import PDropPruner, drop_layers, light_attention_flops, stage_fraction
from lmms_sgl.baselines.visionzip import (
    VISION_ATTENTION_NAME,
    ContextualMerge,
    VisionZipRecorder,
    split_counts,
)
from lmms_sgl.families import InternVLFamily, LlavaFamily
from lmms_sgl.method import cost
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.method.pruning import VisualTokenPruner, decoder_layers
from lmms_sgl.method.selection import KeepPlan, keep_count, pack_positions
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.stages import compose, staged_generation_flops, staged_token_ratio
from lmms_sgl.pipeline import SGLPipeline
from tests.helpers import batch, greedy, load
from tests.test_pipeline import GEN, answers, samples

RATIO = 0.25


def visual_sets(plan: KeepPlan, visual: torch.Tensor) -> list[list[int]]:
    """Per sample, the ordinals (among its visual tokens) the plan keeps: padding-independent."""
    out = []
    for b in range(visual.shape[0]):
        kept = set(plan.index[b][plan.valid[b]].tolist())
        out.append([i for i, p in enumerate(visual[b].nonzero().flatten().tolist()) if p in kept])
    return out


def noise_batch(processor, indices=(0, 1)):
    """Two prompts with noise images (one tile each): distinct tokens, no exact ties."""
    from PIL import Image

    from tests.helpers import QUESTIONS, prompt

    generator = torch.Generator().manual_seed(7)
    images = [
        Image.fromarray(torch.randint(0, 256, (448, 448, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(2)
    ]
    texts = [prompt(processor, QUESTIONS[i]) for i in indices]
    return processor(images=[images[i] for i in indices], text=texts, return_tensors="pt", padding=True)


def alone_and_batched(processor, run, make=batch):
    """``run(inputs)`` -> visual sets, on the batch of samples 0 and 1 and on each alone."""
    together = run(make(processor, (0, 1)))
    alone = [run(make(processor, (i,)))[0] for i in (0, 1)]
    return together, alone


# -- DivPrune ----------------------------------------------------------------------------------
def greedy_max_min(features: torch.Tensor, count: int) -> list[int]:
    """Algorithm 1 of the paper spelled out: pairwise cosine distances, then the token farthest from
    its nearest neighbour, then repeatedly the one farthest from the chosen set."""
    f = features.double()
    d = 1 - torch.nn.functional.cosine_similarity(f[:, None, :], f[None, :, :], dim=-1)
    n = d.shape[0]
    others = d + torch.diag(torch.full((n,), float("inf"), dtype=d.dtype))
    chosen = [int(others.min(1).values.argmax())]
    while len(chosen) < count:
        rest = [i for i in range(n) if i not in chosen]
        to_chosen = d[rest][:, chosen].min(1).values
        chosen.append(rest[int(to_chosen.argmax())])
    return sorted(chosen)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_divprune_at_layer_k_keeps_the_max_min_set_of_the_hidden_states_entering_it(models_dir, family):
    """The project's extension, DivPrune from layer K >= 1: the official rule on the hidden states that
    enter layer K, read independently with ``output_hidden_states`` (entry K), alone and in a batch;
    at keep ratio 1 the unpruned model."""
    from lmms_sgl.baselines.divprune import hidden_state_plan_source

    model, processor = load(models_dir / f"{family}-large")
    text_model = model.model.language_model
    layer_k = 2

    def run(inputs):
        visual = inputs.input_ids == model.config.image_token_id
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[layer_k]
        expected = [official_divprune(hidden[b][visual[b]], RATIO) for b in range(visual.shape[0])]
        pruner = VisualTokenPruner(text_model, layer_k)
        with pruner.installed():
            pruner.arm(hidden_state_plan_source(pruner, visual, inputs.attention_mask, RATIO))
            greedy(model, inputs, 2)
            plan = pruner.plan
        assert visual_sets(plan, visual) == expected
        return visual_sets(plan, visual)

    together, alone = alone_and_batched(processor, run, noise_batch)
    assert together == alone and all(len(s) for s in together)
    inputs = noise_batch(processor)
    visual = inputs.input_ids == model.config.image_token_id
    reference = greedy(model, inputs, 3)
    pruner = VisualTokenPruner(text_model, layer_k)
    with pruner.installed():
        pruner.arm(hidden_state_plan_source(pruner, visual, inputs.attention_mask, 1.0))
        assert torch.equal(greedy(model, inputs, 3), reference)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_divprune_keeps_the_greedy_max_min_set_alone_and_in_a_batch(models_dir, family):
    model, processor = load(models_dir / f"{family}-large")
    text_model = model.model.language_model

    def run(inputs):
        visual = inputs.input_ids == model.config.image_token_id
        with torch.no_grad():  # the embeddings the LM receives, read independently
            embeds = model(**inputs, output_hidden_states=True).hidden_states[0]
        expected = []
        for b in range(visual.shape[0]):
            rows = embeds[b][visual[b]]
            expected.append(official_divprune(rows, RATIO))
        tap = InputEmbeddingTap(text_model)
        pruner = VisualTokenPruner(text_model, 0)
        with tap.active(), pruner.installed():
            pruner.arm(divprune_plan_source(tap, visual, inputs.attention_mask, RATIO))
            greedy(model, inputs, 2)
            plan = pruner.plan
        assert torch.allclose(tap.embeds, embeds)
        assert visual_sets(plan, visual) == expected
        return visual_sets(plan, visual)

    together, alone = alone_and_batched(processor, run, noise_batch)
    assert together == alone and all(len(s) for s in together)


def official_divprune(features: torch.Tensor, ratio: float) -> list[int]:
    """The official selection, transcribed from ``DivPrune`` in ``vbdi/divprune`` 799e2d9
    (``LLaVA/llava/model/llava_arch.py``): ``int(round(ratio * N))`` picks; the first has the largest
    second-smallest distance in its column, each next the largest distance to the picked rows."""
    terms = int(round(ratio * features.shape[0]))
    unit = features / features.norm(dim=1, keepdim=True)
    matrix = 1.0 - unit @ unit.t()
    picks = torch.empty(terms, dtype=torch.long)
    for i in range(terms):
        if i == 0:
            scores = torch.topk(matrix, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(matrix, 0, picks[:i]), dim=0).values
        picks[i] = torch.argmax(scores)
    return sorted(picks.tolist())


@pytest.mark.parametrize("count,ratio", [(256, 0.35), (576, 0.09), (256, 0.09), (100, 0.5)])
def test_divprune_plan_keeps_the_official_tokens_on_random_embeddings(count, ratio):
    """Two samples of different lengths, left-padded, and each alone: the official count (rounded,
    not floored) and the official picks."""
    generator = torch.Generator().manual_seed(count)
    lengths = [count, count - 7]
    text = 5
    width = text + max(lengths)
    embeds = torch.randn(2, width, 16, generator=generator)
    attention = torch.zeros(2, width, dtype=torch.long)
    visual = torch.zeros(2, width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        attention[b, width - n - text :] = 1
        visual[b, width - n - text + 2 : width - text + 2] = True
    from lmms_sgl.baselines.divprune import divprune_plan

    plan = divprune_plan(embeds, visual, attention, ratio)
    for b in range(2):
        expected = official_divprune(embeds[b][visual[b]], ratio)
        assert visual_sets(plan, visual)[b] == expected
        alone = divprune_plan(embeds[b : b + 1], visual[b : b + 1], attention[b : b + 1], ratio)
        assert visual_sets(alone, visual[b : b + 1])[0] == expected
    assert plan.kept_visual[0] == int(round(ratio * count))


def test_divprune_selection_matches_the_reference_loop_on_random_vectors():
    torch.manual_seed(0)
    features = torch.randn(40, 8)
    from lmms_sgl.baselines.divprune import max_min_select

    assert sorted(max_min_select(features, 9).tolist()) == greedy_max_min(features, 9)


# -- PDrop -------------------------------------------------------------------------------------
def official_pdrop_rank(layer, hidden, positions, rotary, real, visual, keep):
    """One drop of the official ``pdrop_rank_drop`` (``Cooperx521/PyramidDrop`` 6444f30,
    ``llava/model/modeling_llama_pdrop.py``) for one sample, transcribed: the next stage's first
    layer's ``input_layernorm``, ``q_proj`` and ``k_proj`` on the hidden states entering it, RoPE at
    ``positions``, the last prompt token's row over every key (causal and padding mask), softmax in
    fp32, mean over heads, top ``keep`` image tokens. ``hidden`` ``[P, D]``; returns slot indices.
    (The official code assumes as many key as query heads; the key heads are repeated here.)"""
    attn = layer.self_attn
    hd = attn.head_dim
    h = layer.input_layernorm(hidden[None])
    query_states = attn.q_proj(h).view(1, h.shape[1], -1, hd).transpose(1, 2)
    key_states = attn.k_proj(h).view(1, h.shape[1], -1, hd).transpose(1, 2)
    cos, sin = rotary(h, positions[None])
    rotate = lambda x: torch.cat((-x[..., hd // 2 :], x[..., : hd // 2]), dim=-1)  # noqa: E731
    query_states = query_states * cos[:, None] + rotate(query_states) * sin[:, None]
    key_states = key_states * cos[:, None] + rotate(key_states) * sin[:, None]
    key_states = key_states.repeat_interleave(query_states.shape[1] // key_states.shape[1], dim=1)
    last = int(real.nonzero().max())
    text_query_states = query_states[0, :, last].unsqueeze(1)  # [H, 1, hd]
    weights = torch.matmul(text_query_states, key_states[0].transpose(1, 2)) / hd**0.5
    allowed = real & (torch.arange(len(real)) <= last)
    weights = weights + torch.where(allowed, 0.0, torch.finfo(weights.dtype).min)
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32)
    attention_avg_head = torch.mean(weights, dim=0)[:, visual]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    return visual.nonzero().flatten()[attention_avg_text.topk(keep).indices.sort().values]


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_pdrop_stages_follow_the_official_light_attention_of_the_next_layer(models_dir, family):
    path = models_dir / f"{family}-large"
    model, processor = load(path, {"text_config": "sdpa", "vision_config": "sdpa"})
    eager, _ = load(path, "eager")
    text = eager.model.language_model
    layers = drop_layers(4, 1)
    fraction = stage_fraction(layers, 4, 0.3)
    assert layers == [1, 2, 3] and 0 < fraction < 1

    def reference(inputs) -> KeepPlan:
        """Stage by stage: the eager model pruned by the stages so far, the hidden states entering
        the drop layer read with output_hidden_states, the official rank on each sample."""
        visual = inputs.input_ids == model.config.image_token_id
        originals = visual.sum(1).tolist()
        plans: list[tuple[int, KeepPlan]] = []
        composed = None
        for stage, layer in enumerate(layers):
            pruners = [VisualTokenPruner(text, at) for at, _ in plans]
            for pruner, (_, plan) in zip(pruners, plans, strict=True):
                pruner.install()
                pruner.arm(plan)
            try:
                with torch.no_grad():
                    hidden = eager(**inputs, output_hidden_states=True).hidden_states[layer]
            finally:
                for pruner in pruners:
                    pruner.remove()
            width = inputs.input_ids.shape[1]
            index = (
                torch.arange(width)[None].expand(len(originals), -1) if composed is None else composed.index
            )
            real = inputs.attention_mask.bool() if composed is None else composed.valid
            vis = visual.gather(1, index) & real
            kept = []
            for b in range(vis.shape[0]):
                keep = int(originals[b] * fraction ** (stage + 1))
                with torch.no_grad():
                    chosen = official_pdrop_rank(
                        text.layers[layer], hidden[b], index[b], text.rotary_emb, real[b], vis[b], keep
                    )
                text_slots = (real[b] & ~vis[b]).nonzero().flatten()
                kept.append(torch.sort(torch.cat([text_slots, chosen])).values)
            packed, valid = pack_positions(kept, index.shape[1])
            kept_visual = tuple(int((vis[b][packed[b][valid[b]]]).sum()) for b in range(vis.shape[0]))
            plan = KeepPlan(packed, valid, index.shape[1], kept_visual, tuple(vis.sum(1).tolist()))
            plans.append((layer, plan))
            composed = plan if composed is None else compose(composed, plan)
        return composed

    def run(inputs):
        visual = inputs.input_ids == model.config.image_token_id
        staged = PDropPruner(model.model.language_model, layers, fraction)
        with staged.installed():
            staged.arm(visual, inputs.attention_mask, None)
            out = greedy(model, inputs, 3)
            plan = staged.plan
            counts = [kept for _, kept in staged.stages(0)]
        expected = reference(inputs)
        assert visual_sets(plan, visual) == visual_sets(expected, visual)
        n = int(visual[0].sum())
        assert counts == [int(n * fraction ** (s + 1)) for s in range(3)]
        assert out.shape[1] == inputs.input_ids.shape[1] + 3
        return visual_sets(plan, visual)

    together, alone = alone_and_batched(processor, run, noise_batch)
    assert together == alone


def test_pdrop_stage_fraction_reaches_the_layer_averaged_ratio():
    for layers, total, keep in (([8, 16, 24], 32, 0.25), ([1, 4, 8], 12, 0.127), ([1, 2, 3], 4, 0.5)):
        fraction = stage_fraction(layers, total, keep)
        ends = [*layers[1:], total]
        average = sum(
            (e - s) * fraction ** (i + 1) for i, (s, e) in enumerate(zip(layers, ends, strict=True))
        )
        assert average / (total - layers[0]) == pytest.approx(keep, abs=1e-9)
    assert stage_fraction([8, 16, 24], 32, 1.0) == 1.0
    # the paper's default (drops at 8, 16, 24 of 32, lambda = 0.5) is layer-averaged 46.9 %
    stages = [(8, 288), (16, 144), (24, 72)]
    assert staged_token_ratio(32, 576, stages) == pytest.approx((8 + 8 * (0.5 + 0.25 + 0.125)) / 32)
    assert drop_layers(32, 8) == [8, 16, 24]


def test_one_stage_costs_what_the_single_layer_formula_says():
    from lmms_sgl.method.cost import TransformerShape

    shape = TransformerShape(12, 64, 4, 2, 16, 192, True, 1000)
    for k, kept in ((1, 30), (0, 5), (6, 200)):
        assert staged_generation_flops(shape, 300, 256, 7, [(k, kept)]) == cost.generation_flops(
            shape, 300, 7, k, 300 - 256 + kept
        )
        assert staged_token_ratio(12, 256, [(k, kept)]) == pytest.approx(
            cost.measured_token_ratio(k, 12, kept, 256)
        )


# -- VisionZip ---------------------------------------------------------------------------------
def official_visionzip(attn, hidden, metric, dominant, contextual):
    """The official selection and merge, transcribed from ``CLIPVisionTower_VisionZip.forward``
    (``dvlab-research/VisionZip`` 3151f6d, ``visionzip/clip_encoder.py``) on one layer's tensors with
    [CLS] at 0: ``attn`` ``[B, H, N, N]``, ``hidden`` ``[B, N, C]`` (its output), ``metric``
    ``[B, N, hd]`` (its keys averaged over heads); ``dominant`` counts [CLS] (``main.py``). Returns,
    per image, the kept patch indices (0-based after [CLS]) and ``{target patch: contextual token}``."""
    images, n, width = hidden.shape
    dominant_num = dominant - 1
    cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)
    top = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(images, 1, dtype=top.dtype), top], dim=1)
    mask = torch.ones(images, n, dtype=torch.bool).scatter_(1, all_indices, False)
    left = n - (dominant_num + 1)
    metric_filtered = metric[mask].view(images, left, metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(images, left, width)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, left // contextual)
    target_indices = torch.arange(0, left, step)[:contextual]
    is_target = torch.isin(torch.arange(left), target_indices)
    similarity = torch.bmm(
        metric_normalized[:, ~is_target], metric_normalized[:, target_indices].transpose(1, 2)
    )
    assign = torch.zeros(images, int((~is_target).sum()), contextual)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, ~is_target]) / counts
    contextual_tokens = hidden_filtered[:, target_indices] + aggregated
    out = []
    for i in range(images):
        remaining = mask[i].nonzero().flatten()  # original indices of the filtered tokens
        targets = (remaining[target_indices] - 1).tolist()
        kept = sorted((top[i] - 1).tolist() + targets)
        out.append((kept, {t: contextual_tokens[i, j] for j, t in enumerate(targets)}))
    return out


def visionzip_matches(model, parts, inputs, visual, expected, layouts=None) -> list[list[int]]:
    """Generate with VisionZip armed at RATIO; its keep set and merged features must equal
    ``expected`` (per sample: kept visual ordinals, ``{ordinal: contextual token}``)."""
    text = model.model.language_model
    recorder = VisionZipRecorder(parts)
    merge = ContextualMerge(recorder, visual, inputs["attention_mask"], RATIO, None, layouts)
    pruner = VisualTokenPruner(text, 0)
    with recorder.active(), pruner.installed(), merge.writing(decoder_layers(text)[0]):
        pruner.arm(merge.source())
        greedy(model, inputs, 2)
        plan = pruner.plan
    sets = visual_sets(plan, visual)
    assert sets == [kept for kept, _ in expected]
    for b, (_, tokens) in enumerate(expected):
        positions = visual[b].nonzero().flatten()
        for ordinal, token in tokens.items():
            merged = merge.merged[(b, int(positions[ordinal]))]
            assert torch.allclose(merged, token, atol=1e-5, rtol=0)
    return sets


@pytest.mark.parametrize("keep", [64, 23, 11, 7])
def test_visionzip_choice_equals_the_official_rule_on_random_tensors(keep):
    from lmms_sgl.baselines.visionzip import choose, contextual_value

    generator = torch.Generator().manual_seed(keep)
    images, heads, n, head_dim, width = 3, 4, 1 + 144, 8, 12
    attn = torch.softmax(torch.randn(images, heads, n, n, generator=generator), dim=-1)
    keys = torch.randn(images, heads, n, head_dim, generator=generator)
    hidden = torch.randn(images, n, width, generator=generator)
    dominant, contextual = split_counts(keep)
    expected = official_visionzip(attn, hidden, keys.mean(1), dominant, contextual)
    for i, (kept, tokens) in enumerate(expected):
        received = attn[i, :, 0, 1:].mean(0)  # the recorder's score: heads averaged (same order)
        choice = choose(received, keys[i].mean(0)[1:], keep, has_cls=True)
        assert choice.kept.tolist() == kept
        assert sorted(choice.groups) == sorted(tokens)
        for target, members in choice.groups.items():
            merged = contextual_value(hidden[i, 1:], members)
            assert torch.allclose(merged, tokens[target], atol=1e-6, rtol=0)


def test_visionzip_keeps_the_official_tokens_and_merged_features_read_with_output_attentions(models_dir):
    path = models_dir / "llava-large"
    model, processor = load(path, {"text_config": "sdpa", "vision_config": VISION_ATTENTION_NAME})
    eager, _ = load(path, "eager")
    family = LlavaFamily()

    class Loaded:  # what visionzip_parts reads of a LoadedVLM
        def __init__(self, m):
            self.model = m

    parts = family.visionzip_parts(Loaded(model))
    layer = len(model.model.vision_tower.encoder.layers) - 1  # vision_feature_layer = -1

    def reference(inputs):
        """The official rule on the eager tower's attentions, its layer output and its keys
        recomputed from the layer's input (CLIP: ``k_proj(layer_norm1(x))``), heads averaged."""
        tower = eager.model.vision_tower
        with torch.no_grad():
            out = tower(inputs.pixel_values, output_attentions=True, output_hidden_states=True)
            block = tower.encoder.layers[layer]
            keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer]))
            metric = keys.view(*keys.shape[:2], block.self_attn.num_heads, -1).mean(2)
        n_visual = out.hidden_states[-1].shape[1] - 1
        dominant, contextual = split_counts(keep_count(n_visual, RATIO))
        return official_visionzip(
            out.attentions[layer], out.hidden_states[layer + 1], metric, dominant, contextual
        )

    def run(inputs):
        visual = inputs.input_ids == model.config.image_token_id
        return visionzip_matches(model, parts, inputs, visual, reference(inputs))

    together, alone = alone_and_batched(processor, run, noise_batch)
    assert together == alone


def test_visionzip_on_llava_next_selects_per_crop_as_the_official_code(models_dir):
    """LLaVA-NeXT, as the official ``llava_arch.py``: the base image and every crop are selected on
    their own, by the official rule, here among the patches that reach the LM (unpadding drops the
    others; newline tokens are not kept). The reference reads the eager tower per crop and finds which
    LM token each patch became by matching the unpruned LM's input embeddings to the projected patch
    features (the model's own packing), not through the family's layout; two images of different
    shapes (different crop grids), alone and batched."""
    from PIL import Image

    from lmms_sgl.families import Prompt

    family = LlavaFamily()
    loaded = family.load(
        str(models_dir / "llava-next-large"),
        dtype=torch.float32,
        device_map="cpu",
        text_attention="sdpa",
        vision_attention=VISION_ATTENTION_NAME,
    )
    eager, _ = load(models_dir / "llava-next-large", "eager")
    family.check_visionzip(str(models_dir / "llava-next-large"), "pretrained")
    parts = family.visionzip_parts(loaded)
    tower = eager.model.vision_tower
    layer = len(tower.encoder.layers) - 2  # vision_feature_layer = -2
    generator = torch.Generator().manual_seed(5)

    def noise(width, height):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy())

    prompts = [Prompt("What is it?", [noise(200, 90)]), Prompt("And this?", [noise(100, 230)])]

    def reference(inputs):
        visual = inputs["input_ids"] == loaded.image_token_id
        with torch.no_grad():
            embeds = eager(**inputs, output_hidden_states=True).hidden_states[0]
        out = []
        for b in range(visual.shape[0]):
            crops = family._crops(loaded, inputs, b)
            pixels = inputs["pixel_values"][b, :crops]
            with torch.no_grad():
                vision = tower(pixels, output_attentions=True, output_hidden_states=True)
                block = tower.encoder.layers[layer]
                keys = block.self_attn.k_proj(block.layer_norm1(vision.hidden_states[layer]))
                metric = keys.view(*keys.shape[:2], block.self_attn.num_heads, -1).mean(2)
                hidden = vision.hidden_states[layer + 1]  # what the projector reads, [CLS] first
                projected = eager.model.multi_modal_projector(hidden[:, 1:])  # [crops, P, D]
            lm = embeds[b][visual[b]]
            flat = projected.reshape(-1, projected.shape[-1])
            distance, nearest = torch.cdist(lm, flat, compute_mode="donot_use_mm_for_euclid_dist").min(1)
            matched = distance < 1e-4  # the rest are newline tokens
            where = {int(n): t for t, n in enumerate(nearest.tolist()) if matched[t]}  # (crop, patch) -> LM
            patches = projected.shape[1]
            kept, tokens = [], {}
            for c in range(crops):
                visible = sorted(p for p in range(patches) if c * patches + p in where)
                index = torch.tensor([0] + [p + 1 for p in visible])
                attn = vision.attentions[layer][c : c + 1][:, :, index][:, :, :, index]
                dominant, contextual = split_counts(keep_count(len(visible), RATIO))
                (kept_c, tokens_c) = official_visionzip(
                    attn, hidden[c : c + 1, index], metric[c : c + 1, index], dominant, contextual
                )[0]
                kept += [where[c * patches + visible[k]] for k in kept_c]
                tokens.update({where[c * patches + visible[t]]: v for t, v in tokens_c.items()})
            out.append((sorted(kept), tokens))
        return out

    def run(chosen):
        inputs = loaded.family.build_batch(loaded, chosen)
        visual = inputs["input_ids"] == loaded.image_token_id
        layouts = parts.image_layouts(inputs)
        return visionzip_matches(loaded.model, parts, inputs, visual, reference(inputs), layouts)

    together = run(prompts)
    alone = [run([p])[0] for p in prompts]
    assert together == alone


# -- through the pipeline: no-op settings, batches, costs ----------------------------------------
FAMILIES = {"internvl": InternVLFamily, "llava": LlavaFamily, "llava-next": LlavaFamily}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def large(request, models_dir):
    family = FAMILIES[request.param](max_tiles=2)  # still several tiles, at a third of the tokens
    return family.load(
        str(models_dir / f"{request.param}-large"),
        dtype=torch.float32,
        device_map="cpu",
        text_attention=ATTENTION_NAME,
        vision_attention=VISION_ATTENTION_NAME,
    )


SETTINGS = {
    "divprune": {"prune_layer": 0.0},
    "visionzip": {"prune_layer": 0.0},
    "pdrop": {"prune_layer": 0.3},
}


@pytest.fixture(scope="module")
def unpruned(large) -> tuple[list[str], float]:
    """The unpruned large model's answers and log-likelihood, computed once per family."""
    alone = SGLPipeline(large, None, SGLSettings(method="large_only"))
    (loss, _), _ = alone.loglikelihood(samples()[0], " red")
    return answers(alone.generate(samples(), GEN)), loss


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_keep_ratio_one_equals_the_unpruned_model(large, unpruned, method):
    full = SGLPipeline(large, None, SGLSettings(method=method, keep_ratio=1.0, **SETTINGS[method]))
    records = full.generate(samples(), GEN)
    reference_answers, reference_loss = unpruned
    assert answers(records) == reference_answers
    assert all(r.fallback is None and r.token_ratio == 1.0 for r in records if r.total_visual)
    (loss, _), _ = full.loglikelihood(samples()[0], " red")
    assert loss == pytest.approx(reference_loss, abs=1e-4)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_pipeline_batch_equals_one_by_one_and_costs_less(large, method):
    pipeline = SGLPipeline(large, None, SGLSettings(method=method, keep_ratio=0.2, **SETTINGS[method]))
    together = pipeline.generate(samples(), GEN)
    alone = [pipeline.generate([s], GEN)[0] for s in samples()]
    assert answers(together) == answers(alone)
    for a, b in zip(together, alone, strict=True):
        assert a.kept_visual == b.kept_visual and a.flops == pytest.approx(b.flops)
        assert a.fallback is None
    for record in together[:3]:
        assert record.kept_visual < record.total_visual and record.flops < record.flops_large_alone
        target = SGLSettings(method=method, keep_ratio=0.2, **SETTINGS[method]).expected_token_ratio(4)
        # VisionZip: [CLS] takes one dominant slot per crop and NeXT's newline tokens are not kept
        assert record.token_ratio == pytest.approx(target, abs=0.04 if method == "visionzip" else 0.03)


# -- bad input -----------------------------------------------------------------------------------
def test_methods_reject_settings_they_cannot_honour():
    with pytest.raises(
        ValueError, match=r"method='visionzip' prunes before the language model.*prune_layer=0.2"
    ):
        SGLSettings(method="visionzip", prune_layer=0.2)
    with pytest.raises(ValueError, match=r"method='pdrop' ranks at layer K-1 and needs K >= 1"):
        SGLSettings(method="pdrop", prune_layer=0.0).layer_k(12)
    from lmms_sgl.lmms.args import parse_model_args

    args = parse_model_args(pretrained="big", method="visionzip", token_ratio=0.35)
    assert (args.settings.prune_layer, args.settings.keep_ratio, args.guide) == (0.0, 0.35, None)
    with pytest.raises(ValueError, match=r"method='visionzip' prunes before.*prune_layer=0.5"):
        parse_model_args(pretrained="big", method="visionzip", prune_layer=0.5)


@pytest.mark.parametrize(
    "model,checkpoint,message",
    [
        ("sgl_qwen2_vl", "qwen3-vl-large", r"'qwen3_vl' checkpoint, whose deepstack features"),
        (
            "sgl_llava",
            "llava-ov-large",
            r"'llava_onevision' checkpoint.*implemented for LLaVA-1.5 \('llava'\) and LLaVA-NeXT",
        ),
    ],
)
def test_visionzip_on_a_family_without_it_fails_before_loading(
    models_dir, monkeypatch, model, checkpoint, message
):
    from lmms_sgl.families.base import HFVisionLanguageFamily
    from lmms_sgl.lmms.registry import MODELS

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(HFVisionLanguageFamily, "load", no_loading)
    import importlib

    module, _, name = MODELS[model].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ValueError, match=message):
        cls(pretrained=str(models_dir / checkpoint), method="visionzip", keep_ratio=0.3)


def test_pdrop_counted_flops_match_the_flop_counter(models_dir):
    """Every matrix product of a PDrop generation but CPU SDPA's is visible to
    ``torch.utils.flop_counter``: the staged formula plus each drop's light attention, with the SDPA attention
    products (written out here) taken away, must equal what it counts in the text model and LM head."""
    from torch.utils.flop_counter import FlopCounterMode

    from lmms_sgl.method.stages import layer_tokens
    from tests.test_method_cost import text_flops

    model, processor = load(models_dir / "llava-large", {"text_config": "sdpa", "vision_config": "sdpa"})
    inputs = batch(processor, (0,))
    visual = inputs.input_ids == model.config.image_token_id
    layers, steps = drop_layers(4, 1), 4
    staged = PDropPruner(model.model.language_model, layers, stage_fraction(layers, 4, 0.3))
    with staged.installed():
        staged.arm(visual, inputs.attention_mask, None)
        with FlopCounterMode(display=False) as counter:
            greedy(model, inputs, steps)
        stages = staged.stages(0)
    shape = cost.TransformerShape.from_text_config(model.config.text_config)
    prompt, n_visual = inputs.input_ids.shape[1], int(visual.sum())
    seen = layer_tokens(shape.num_layers, prompt, n_visual, stages)
    assert len(set(seen)) == 4, "three drops: four different sequence lengths"
    per_key = 4 * shape.heads * shape.head_dim  # QK^T and PV for one query over one key
    sdpa = sum(per_key * n * n for n in seen) + sum(per_key * (n + t) for t in range(1, steps) for n in seen)
    selection = sum(light_attention_flops(shape, seen[layer - 1]) for layer in layers)
    expected = staged_generation_flops(shape, prompt, n_visual, steps, stages) - sdpa + selection
    assert text_flops(counter) == expected


# -- VisionZip on Qwen2-VL: no [CLS], images of different sizes, the merger as projector ------------
QWEN_PIXELS = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}


@pytest.fixture(scope="module", params=["qwen2-vl-large", "qwen2.5-vl-large"])
def qwen2_vl(request, models_dir):
    """Qwen2-VL, and Qwen2.5-VL whose tower holds each image's tokens in attention-window order."""
    from lmms_sgl.families import QwenVLFamily

    family = QwenVLFamily(**QWEN_PIXELS)
    return family.load(
        str(models_dir / request.param),
        dtype=torch.float32,
        device_map="cpu",
        text_attention="sdpa",
        vision_attention=VISION_ATTENTION_NAME,
    )


def qwen_prompts():
    from PIL import Image

    from lmms_sgl.families import Prompt

    generator = torch.Generator().manual_seed(11)

    def noise(width, height):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy())

    # 8 x 6 and 4 x 10 merged tokens: 48 and 40 LM tokens, two contextual tokens each at RATIO
    return [Prompt("What is it?", [noise(224, 168)]), Prompt("And this one?", [noise(112, 280)])]


def reference_choice(received, keys, features) -> tuple[list[int], dict[int, torch.Tensor]]:
    """The official rule for a tower without [CLS] (this package's extension), one image at RATIO:
    the top-``K_d`` tokens by ``received``, every ``R // K_c``-th remaining token a target, each other
    remaining token assigned to its most cosine-similar target by ``keys``; a contextual token is its
    target's feature plus the mean of the features assigned to it."""
    n = received.shape[0]
    dominant_count, contextual_count = split_counts(keep_count(n, RATIO))
    dominant = set(torch.topk(received, dominant_count).indices.tolist())
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // contextual_count)
    targets = rest[::step][:contextual_count]
    members: dict[int, list[int]] = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            sims = [torch.cosine_similarity(keys[i], keys[t], dim=0) for t in targets]
            members[targets[int(torch.stack(sims).argmax())]].append(i)
    tokens = {
        t: features[t] + (features[m].mean(0) if m else torch.zeros_like(features[t]))
        for t, m in members.items()
    }
    return sorted(dominant | set(targets)), tokens


def test_visionzip_on_qwen_vl_reads_the_attention_every_query_pays(qwen2_vl):
    """No [CLS]: each merged token's score is the attention its 2 x 2 patches receive in the last
    block, averaged over heads and every query of its image. The reference recomputes that block's
    queries and keys from its input (a pre-hook, transformers' own rotary function), not through the
    recording attention, and finds which LM token each of the tower's tokens is by matching the
    merger's outputs with the tower's (Qwen2.5-VL holds them in window order); two images of
    different sizes, alone and batched."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    loaded = qwen2_vl
    parts = loaded.family.visionzip_parts(loaded)
    attention, merger, group = parts.attention, parts.projector, parts.group
    text_model = loaded.text_model

    def reference(seen) -> list[tuple[list[int], dict[int, torch.Tensor]]]:
        hidden, cos, sin, cu = seen["hidden"], *seen["rotary"], seen["cu"]
        n, heads = hidden.shape[0], attention.num_heads
        q, k, _ = attention.qkv(hidden).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        lm_index = torch.cdist(seen["merger_output"], seen["tower_output"]).argmin(1)  # tower -> LM order
        assert sorted(lm_index.tolist()) == list(range(n // group))
        out = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            qi, ki = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)  # [H, n, hd]
            probs = torch.softmax((qi @ ki.transpose(-1, -2)) * attention.scaling, dim=-1)
            received = probs.mean(dim=(0, 1)).view(-1, group).sum(1)  # per merged token
            keys = ki.mean(0).view(-1, group, ki.shape[2]).mean(1)  # heads, then the merged patches
            features = seen["merger_input"][start:end].reshape(-1, group * hidden.shape[1])
            local = lm_index[start // group : end // group] - start // group
            order = torch.argsort(local)  # the rows in LM order
            received, keys, features = received[order], keys[order], features[order]
            out.append(reference_choice(received, keys, features))
        return out

    def run(prompts):
        inputs = loaded.family.build_batch(loaded, prompts)
        visual = inputs["input_ids"] == loaded.image_token_id
        seen = {}

        def take_block_input(module, args, kwargs):
            seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
            seen["rotary"] = kwargs["position_embeddings"]
            seen["cu"] = kwargs["cu_seqlens"]

        def take_merger_input(module, args):  # the tower's call, not the merge's later projection
            if "merger_input" not in seen:
                seen["merger_input"] = args[0].detach()

        def take_merger_output(module, args, output):
            if "merger_output" not in seen:
                seen["merger_output"] = output.detach()

        def take_tower_output(module, args, output):
            seen["tower_output"] = output.pooler_output.detach()

        recorder = VisionZipRecorder(parts)
        orders = parts.token_order(inputs) if parts.token_order else None  # as the planner passes them
        merge = ContextualMerge(recorder, visual, inputs["attention_mask"], RATIO, orders)
        pruner = VisualTokenPruner(text_model, 0)
        hooks = [
            attention.register_forward_pre_hook(take_block_input, with_kwargs=True),
            merger.register_forward_pre_hook(take_merger_input),
            merger.register_forward_hook(take_merger_output),
            loaded.family.vision_tower(loaded.model).register_forward_hook(take_tower_output),
        ]
        try:
            with recorder.active(), pruner.installed(), merge.writing(decoder_layers(text_model)[0]):
                pruner.arm(merge.source())
                with torch.no_grad():
                    loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
                plan = pruner.plan
        finally:
            for hook in hooks:
                hook.remove()
        assert len(recorder.features) == 1  # the tower's call, not the merge's own projection
        expected = reference(seen)
        sets = visual_sets(plan, visual)
        per_sample, image = [], 0
        for b in range(visual.shape[0]):  # one image per prompt
            kept, means = expected[image]
            assert sets[b] == kept
            positions = visual[b].nonzero().flatten()
            for target, mean in means.items():
                torch.testing.assert_close(merge.merged[(b, int(positions[target]))], mean, rtol=0, atol=1e-5)
            per_sample.append(sets[b])
            image += 1
        assert merge.patches == [[len(positions) * group] for positions in (v.nonzero() for v in visual)]
        return per_sample

    prompts = qwen_prompts()
    together = run(prompts)
    assert together == [run([p])[0] for p in prompts]
    assert len(together[0]) != len(together[1])  # images of different sizes keep different counts


def test_visionzip_on_qwen_vl_through_the_pipeline(qwen2_vl):
    """keep_ratio=1 answers as the unpruned model; a batch equals each sample alone, costs less
    than the large model alone, and reaches the asked ratio."""
    from lmms_sgl.pipeline import Sample

    samples_ = [Sample("t", i, p) for i, p in enumerate(qwen_prompts())]
    unpruned = SGLPipeline(qwen2_vl, None, SGLSettings(method="large_only")).generate(samples_, GEN)
    full = SGLPipeline(qwen2_vl, None, SGLSettings(method="visionzip", prune_layer=0.0, keep_ratio=1.0))
    assert answers(full.generate(samples_, GEN)) == answers(unpruned)
    pipeline = SGLPipeline(qwen2_vl, None, SGLSettings(method="visionzip", prune_layer=0.0, keep_ratio=0.3))
    together = pipeline.generate(samples_, GEN)
    alone = [pipeline.generate([s], GEN)[0] for s in samples_]
    assert answers(together) == answers(alone)
    for a, b in zip(together, alone, strict=True):
        assert a.fallback is None and a.kept_visual == b.kept_visual and a.flops == pytest.approx(b.flops)
        assert a.kept_visual == keep_count(a.total_visual, 0.3) and a.flops < a.flops_large_alone


def test_visionzip_on_qwen_vl_answers_a_video_unpruned_and_counts_it(qwen2_vl, monkeypatch):
    """The tower encodes a request's videos after its images, out of the prompt's order: such a
    request is answered by the unpruned large model, the reason in its record; an image request in
    the same batch is still pruned."""
    from lmms_sgl.families import Prompt
    from lmms_sgl.families.video import open_video
    from lmms_sgl.pipeline import Sample

    clip = Path(__file__).resolve().parent.parent / "tasks/sgl_video/data/videos/video-000.mp4"
    monkeypatch.setattr(qwen2_vl.family, "num_frames", 4)
    video = Sample("t", 0, Prompt("What moves?", [], [open_video(str(clip))]))
    image = Sample("t", 1, qwen_prompts()[0])
    pipeline = SGLPipeline(qwen2_vl, None, SGLSettings(method="visionzip", prune_layer=0.0, keep_ratio=0.3))
    moving, still = pipeline.generate([video, image], GEN)
    assert "method='visionzip' takes images only" in moving.fallback and moving.answer
    assert still.fallback is None and still.kept_visual < still.total_visual


def recorded_attention_flops(loaded, prompts) -> tuple[int, int]:
    """What ``torch.utils.flop_counter`` sees VisionZip's recorder add to a forward (the forward is
    the same with and without it), and what the selection cost counts for that recording."""
    from torch.utils.flop_counter import FlopCounterMode

    from lmms_sgl.baselines import visionzip

    inputs = loaded.family.build_batch(loaded, prompts)
    parts = loaded.family.visionzip_parts(loaded)
    counted = []
    for recording in (False, True):
        recorder = VisionZipRecorder(parts)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if recording:
                with recorder.active():
                    loaded.model(**inputs)
            else:
                loaded.model(**inputs)
        counted.append(counter.get_total_flops())
    assert recorder.patches, "the recorder saw the vision tower"
    heads, head_dim = parts.attention.num_heads, parts.attention.head_dim
    cls = parts.cls_index is not None
    return counted[1] - counted[0], visionzip.selection_flops(recorder.patches, heads, head_dim, cls, 0, 0, 0)


def test_visionzip_recorded_cls_attention_flops_match_the_flop_counter(large):
    """[CLS] towers (LLaVA-1.5, InternVL tiles): one recorded row per image."""
    seen, counted = recorded_attention_flops(large, [s.prompt for s in samples()[:2]])
    assert seen == counted


def test_visionzip_recorded_attention_flops_match_the_flop_counter_without_cls(qwen2_vl):
    """Qwen-VL: every row of each image of its own size is recorded."""
    seen, counted = recorded_attention_flops(qwen2_vl, qwen_prompts())
    assert seen == counted


@pytest.mark.parametrize(
    "method,layer", [("divprune", 0.0), ("divprune", 0.3), ("pdrop", 0.3), ("fastv", 0.3), ("random", 0.3)]
)
def test_priced_operating_point_equals_the_recorded_cost(large, method, layer):
    """The analytic price of an operating point (``lmms_sgl.costs.operating_point``, used to price the
    study at the real pairs) equals what the pipeline recorded for the same requests: the same
    stages, the same selection work, the same vision tower (read back from the record)."""
    from lmms_sgl.costs.layout import ImageLayout, Unit
    from lmms_sgl.costs.methods import Side, Workload
    from lmms_sgl.costs.operating_point import OperatingPoint, PricedPair, point_flops

    pipeline = SGLPipeline(large, None, SGLSettings(method=method, keep_ratio=0.2, prune_layer=layer))
    shape = large.text_shape
    for record in pipeline.generate(samples(), GEN)[:3]:
        answer = max(record.output_tokens, 1)
        vision = record.flops_large_alone - cost.generation_flops(shape, record.input_tokens, answer)
        layout = ImageLayout((Unit("image", record.total_visual, vision),), "recorded", skippable=False)
        side = Side("factory", shape, layout)
        pair = PricedPair("factory", side, side, Workload(record.input_tokens - record.total_visual, answer))
        priced = point_flops(pair, OperatingPoint(method, record.layer_k, 0.2))
        assert priced == pytest.approx(record.flops, rel=1e-9)
        assert point_flops(pair, OperatingPoint("large_only")) == pytest.approx(record.flops_large_alone)
