"""Pay only for what is kept: unit skipping is exact, unit selection equals a reference, FLOPs count
only encoded units, and bad unit arguments fail before loading.

Oracles: the same keep plan run with and without skipping (prefill logits of every kept position,
generated tokens and their decode logits, batch and alone); a spy on the vision tower counts the
rows it really encodes; ``torch.utils.flop_counter`` over the real (eager) vision forward.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt, QwenVLFamily
from lmms_sgl.method.selection import KeepPlan, keep_count, pack_positions
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.units import (
    UnitSkipHooks,
    VisualUnits,
    choose_units,
    kept_visual_mask,
    top_within,
    units_to_encode,
)
from lmms_sgl.pipeline import Sample
from lmms_sgl.pipeline.keep_plans import KeepPlanner
from lmms_sgl.pipeline.records import GuideScores, SampleRecord

TILED = ("internvl", "llava_ov")  # one image, several units; the others: several images
LOAD = {"dtype": torch.float32, "device_map": "cpu", "text_attention": "sdpa"}
QWEN_PIXELS = {"min_pixels": 4 * 32 * 32, "max_pixels": 16 * 32 * 32}

# Per family: a spec and prompts whose images have several units (tiles + thumbnail, base + crops,
# several images), differently tiled within the batch.
CASES = {
    "internvl": (
        lambda: InternVLFamily(max_tiles=4),
        "internvl-large",
        [
            Prompt("What is left?", [Image.new("RGB", (896, 448), (200, 30, 30))]),
            Prompt("What is on top?", [Image.new("RGB", (448, 896), (30, 30, 200))]),
        ],
    ),
    "llava_ov": (
        lambda: LlavaFamily(),
        "llava-ov-large",
        [
            Prompt("What is left?", [Image.new("RGB", (224, 112), (200, 30, 30))]),
            Prompt("What is on top?", [Image.new("RGB", (200, 210), (30, 30, 200))]),
        ],
    ),
    "llava": (
        lambda: LlavaFamily(),
        "llava-large",
        [
            Prompt(
                "Which?",
                [Image.new("RGB", (224, 300 + 20 * i), c) for i, c in enumerate(("red", "blue", "tan"))],
            ),
            Prompt("Three?", [Image.new("RGB", (224, 224), c) for c in ("green", "white", "gray")]),
        ],
    ),
    "qwen3_vl": (
        lambda: QwenVLFamily(**QWEN_PIXELS),
        "qwen3-vl-large",
        [
            Prompt(
                "Which?", [Image.new("RGB", (300, 300), "white"), Image.new("RGB", (200, 500), "gray")] * 2
            ),
            Prompt("Three?", [Image.new("RGB", (200, 200), c) for c in ("green", "red", "blue")]),
        ],
    ),
    "qwen2_5_vl": (
        lambda: QwenVLFamily(**QWEN_PIXELS),
        "qwen2.5-vl-large",
        [
            Prompt(
                "Which?", [Image.new("RGB", (300, 300), "white"), Image.new("RGB", (200, 500), "gray")] * 2
            ),
            Prompt(
                "Three?",
                [Image.new("RGB", (200, 200), c) for c in ("green", "red")] + [Image.new("RGB", (500, 300))],
            ),
        ],
    ),
}


@pytest.fixture(scope="module")
def loaded_models(models_dir):
    cache = {}

    def get(case: str):
        if case not in cache:
            make, name, _ = CASES[case]
            cache[case] = make().load(str(models_dir / name), **LOAD)
        return cache[case]

    return get


def crafted_scores(units: VisualUnits, keep_ratio: float, skip_unit: int, single_unit: int) -> torch.Tensor:
    """Scores whose top-k keeps tokens of every unit but ``skip_unit`` (none) and ``single_unit``
    (exactly one token): the other units' tokens outrank the rest."""
    n = len(units)
    k = keep_count(n, keep_ratio)
    generator = torch.Generator().manual_seed(n)
    scores = torch.rand(n, generator=generator)
    others = [u for u in range(units.count) if u not in (skip_unit, single_unit)]
    pool = torch.cat([(units.owner == u).nonzero().flatten() for u in others])
    assert len(pool) >= k - 1 >= len(others), "the layout is too small for this keep ratio"
    by_unit = [(units.owner == u).nonzero().flatten().tolist() for u in others]
    favoured = [
        t for rank in range(max(map(len, by_unit))) for ids in by_unit if rank < len(ids) for t in [ids[rank]]
    ]
    scores[torch.tensor(favoured[: k - 1])] += 2.0  # exactly k - 1 tokens, every other unit gets some
    scores[(units.owner == single_unit).nonzero().flatten()[0]] = 1.5  # the k-th: above the rest
    return scores


class Spy:
    """Counts the rows (tiles, crops, patches) the vision tower really encodes."""

    def __init__(self, tower):
        self.rows: list[int] = []
        self.tower, self.original = tower, tower.forward

    def __enter__(self):
        def forward(*args, **kwargs):
            given = kwargs.get("pixel_values", kwargs.get("hidden_states", args[0] if args else None))
            self.rows.append(given.shape[0])
            return self.original(*args, **kwargs)

        self.tower.forward = forward
        return self

    def __exit__(self, *exc):
        self.tower.forward = self.original


def run_planned(loaded, prompts, scores, skip: bool, keep_ratio: float):
    """Prefill logits (every position, use_cache off) and 3 greedy tokens with their logits, the
    planner's keep plan applied from layer 0, with or without unit skipping. Top-k selection: the
    crafted scores decide exactly which units the kept tokens touch (spreading would reach them all)."""
    settings = SGLSettings(
        method="sgl", prune_layer=0.0, keep_ratio=keep_ratio, skip_units=skip, selection="topk"
    )
    planner = KeepPlanner(loaded, settings)
    samples = [Sample("t", i, p) for i, p in enumerate(prompts)]
    inputs = loaded.family.build_batch(loaded, prompts)
    visual = inputs["input_ids"] == loaded.image_token_id
    boxes = loaded.family.visual_boxes(loaded, inputs, prompts)
    guide = [GuideScores(s, b) for s, b in zip(scores, boxes, strict=True)]
    out = {}
    tower = loaded.family.vision_tower(loaded.model)
    with torch.no_grad(), Spy(tower) as spy:
        records = [SampleRecord("t", i) for i in range(len(prompts))]
        with planner.pruned(samples, records, inputs, visual, guide) as pruner:
            out["prefill"] = loaded.model(**inputs, use_cache=False).logits
            plan = pruner.plan
        out["use"] = planner.unit_use
        with planner.pruned(samples, records, inputs, visual, guide):
            generated = loaded.model.generate(
                **inputs,
                max_new_tokens=3,
                min_new_tokens=3,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    out["rows"] = spy.rows
    slots = plan.slot_of()
    out["kept_logits"] = [out["prefill"][b, slots[b][slots[b] >= 0]] for b in range(len(prompts))]
    out["tokens"] = generated.sequences[:, inputs["input_ids"].shape[1] :]
    out["logits"] = torch.stack(generated.logits)
    out["plan"], out["visual"] = plan, visual
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_skipping_is_exact_and_encodes_only_needed_units(case, loaded_models):
    loaded = loaded_models(case)
    prompts = CASES[case][2]
    inputs = loaded.family.build_batch(loaded, prompts)
    units = loaded.family.visual_units(loaded, inputs, prompts)
    assert all(isinstance(u, VisualUnits) and u.count >= 3 for u in units), units
    keep_ratio = 0.3
    scores = [crafted_scores(u, keep_ratio, skip_unit=1, single_unit=2) for u in units]
    # the batch of differently tiled images, and (tiled families) one alone
    for batch in ([0, 1], [1]) if case in TILED else ([0, 1],):
        chosen = [prompts[i] for i in batch]
        given = [scores[i] for i in batch]
        skipped = run_planned(loaded, chosen, given, skip=True, keep_ratio=keep_ratio)
        full = run_planned(loaded, chosen, given, skip=False, keep_ratio=keep_ratio)
        for a, b in zip(skipped["kept_logits"], full["kept_logits"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert torch.equal(skipped["tokens"], full["tokens"])
        torch.testing.assert_close(skipped["logits"], full["logits"], rtol=0, atol=1e-5)
        # the spy: rows the tower encoded, once for the prefill, once for generate's prefill
        all_rows = sum(r for i in batch for r in units[i].rows)
        needed = sum(r for i in batch for u, r in enumerate(units[i].rows) if u != 1)
        assert full["rows"] == [all_rows, all_rows]
        assert skipped["rows"] == [needed, needed], (skipped["rows"], needed, all_rows)
        for row, (i, use) in enumerate(zip(batch, skipped["use"], strict=True)):
            assert (use.total, use.encoded) == (units[i].count, units[i].count - 1)
            plan = skipped["plan"]
            kept = kept_visual_mask(plan.index[row], plan.valid[row], skipped["visual"][row])
            assert int(kept[units[i].owner == 2].sum()) == 1  # one kept token: encoded
            assert int(kept[units[i].owner == 1].sum()) == 0  # none: skipped


def test_units_to_encode_reads_and_one_token(loaded_models):
    """Pure rule: a unit read by one kept token is encoded; a kept newline reads nothing."""
    owner = torch.tensor([0, 0, 1, 1, 1, 2])
    reads = torch.nn.functional.one_hot(owner, 3).bool()
    reads[4] = torch.tensor([False, True, True])  # an interpolated token reads units 1 and 2
    reads[5] = False  # a newline reads no unit
    units = VisualUnits(owner, reads, torch.tensor([True, False, False]), (1, 1, 1), (5, 5, 5), (0, 0, 0))
    kept = torch.tensor([False, True, False, False, False, True])
    assert units_to_encode(units, kept).tolist() == [True, False, False]
    kept[4] = True
    assert units_to_encode(units, kept).tolist() == [True, True, True]


def test_unit_hooks_scatter_fractional_rows():
    """Qwen-like: 8 patch rows -> 2 merged tokens per unit; a skipped unit's rows are zeros."""
    tower = torch.nn.Linear(3, 3)
    hooks = UnitSkipHooks([8, 4, 8], [True, False, True], input_name="input")
    x = torch.randn(20, 3)
    with hooks.installed(tower):
        out = tower(x)
    torch.testing.assert_close(out[:8], tower(x[:8]))
    assert torch.equal(out[8:12], torch.zeros(4, 3))
    torch.testing.assert_close(out[12:], tower(x[12:]))


# -- unit selection against an independent reference ------------------------------------------------
def reference_keep(scores: torch.Tensor, n_tiles: int, per_tile: int, keep_units: int, keep_global: bool):
    """InternVL single image: tiles of ``per_tile`` consecutive tokens, the thumbnail last."""
    mass = scores.reshape(n_tiles, per_tile).double().sum(1)
    candidates = list(range(n_tiles - 1)) if keep_global else list(range(n_tiles))
    best = sorted(candidates, key=lambda u: (-float(mass[u]), u))[:keep_units]
    chosen = set(best) | ({n_tiles - 1} if keep_global else set())
    return torch.tensor([t // per_tile in chosen for t in range(len(scores))])


@pytest.mark.parametrize("keep_units,keep_global", [(1, True), (2, True), (2, False)])
def test_unit_selection_equals_reference(keep_units, keep_global, loaded_models):
    from lmms_sgl.method.pruning import VisualTokenPruner

    loaded = loaded_models("internvl")
    prompts = CASES["internvl"][2]
    samples = [Sample("t", i, p) for i, p in enumerate(prompts)]
    inputs = loaded.family.build_batch(loaded, prompts)
    visual = inputs["input_ids"] == loaded.image_token_id
    boxes = loaded.family.visual_boxes(loaded, inputs, prompts)
    counts = visual.sum(1).tolist()
    per_tile = loaded.model.config.image_seq_length
    scores = [torch.rand(n, generator=torch.Generator().manual_seed(7 + n)) for n in counts]
    settings = SGLSettings(
        method="sgl", prune_layer=0.0, keep_ratio=1.0, keep_units=keep_units, keep_global_view=keep_global
    )
    planner = KeepPlanner(loaded, settings)
    records = [SampleRecord("t", i) for i in range(2)]
    guide = [GuideScores(s, b) for s, b in zip(scores, boxes, strict=True)]
    with torch.no_grad(), Spy(loaded.family.vision_tower(loaded.model)) as spy:
        with planner.pruned(samples, records, inputs, visual, guide) as pruner:
            logits = loaded.model(**inputs, use_cache=False).logits
            plan = pruner.plan
    references = [
        reference_keep(s, n // per_tile, per_tile, keep_units, keep_global)
        for s, n in zip(scores, counts, strict=True)
    ]
    for b, ref in enumerate(references):  # the same keep sets
        assert torch.equal(kept_visual_mask(plan.index[b], plan.valid[b], visual[b]), ref)
    # the large model run with the reference keep set from layer 0, by the pruner alone
    kept = []
    for b, ref in enumerate(references):
        text = (inputs["attention_mask"][b].bool() & ~visual[b]).nonzero().flatten()
        kept.append(torch.sort(torch.cat([text, visual[b].nonzero().flatten()[ref]])).values)
    index, valid = pack_positions(kept, visual.shape[1])
    reference_plan = KeepPlan(
        index, valid, visual.shape[1], tuple(int(r.sum()) for r in references), tuple(counts)
    )
    with torch.no_grad(), VisualTokenPruner(loaded.text_model, 0).installed() as pruner:
        pruner.arm(reference_plan)
        expected = loaded.model(**inputs, use_cache=False).logits
    slots = plan.slot_of()
    for b in range(2):
        real = slots[b] >= 0
        torch.testing.assert_close(logits[b, slots[b][real]], expected[b, slots[b][real]], rtol=0, atol=1e-5)
    kept_units = [keep_units + int(keep_global)] * 2
    assert spy.rows == [sum(kept_units)]
    assert [r.extra["units_kept"] for r in records] == kept_units
    thumbnails = [bool(ref[-per_tile:].all()) for ref in references]  # the thumbnail's tokens come last
    assert [r.extra["global_views_kept"] for r in records] == [int(t) for t in thumbnails]


def test_top_within_prunes_inside_the_chosen_units():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    allowed = torch.tensor([False, True, True, True, True, False])
    assert top_within(scores, allowed, 0.5).tolist() == [False, True, True, False, False, False]
    units = VisualUnits.blocks([2, 2, 2], [False, False, True], [1, 1, 1], [1, 1, 1], 0)
    assert choose_units(units, scores, 1, True).tolist() == [True, False, True]
    assert choose_units(units, scores, 1, False).tolist() == [True, False, False]


# -- FLOPs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["internvl", "llava_ov", "qwen2_5_vl"])
def test_counted_vision_flops_with_skipping_match_flop_counter(case, models_dir):
    make, name, prompts = CASES[case]
    loaded = make().load(str(models_dir / name), **{**LOAD, "text_attention": "eager"})
    loaded.model.set_attn_implementation("eager")  # CPU SDPA is invisible to the flop counter
    inputs = loaded.family.build_batch(loaded, prompts)
    units = loaded.family.visual_units(loaded, inputs, prompts)
    keep = [[u % 2 == 0 for u in range(s.count)] for s in units]  # every other unit
    hooks = loaded.family.unit_skip_hooks([r for s in units for r in s.rows], [f for k in keep for f in k])
    counted = sum(f for s, k in zip(units, keep, strict=True) for f, on in zip(s.flops, k, strict=True) if on)
    n_visual = (inputs["input_ids"] == loaded.image_token_id).sum(1).tolist()
    per_sample = loaded.family.vision_flops(loaded, inputs, [len(p.images) for p in prompts], n_visual)
    assert sum(f for s in units for f in s.flops) == sum(per_sample)  # the units sum to the tower's cost
    image_kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    image_kwargs.pop("batch_num_images", None) if case != "llava_ov" else None
    with torch.no_grad(), hooks.installed(*loaded.family.vision_modules(loaded.model)):
        with FlopCounterMode(display=False) as counter:
            if case.startswith("qwen"):
                loaded.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            elif case == "llava_ov":
                loaded.model.model.get_image_features(
                    inputs["pixel_values"],
                    inputs["image_sizes"],
                    vision_feature_layer=loaded.model.config.vision_feature_layer,
                    vision_feature_select_strategy=loaded.model.config.vision_feature_select_strategy,
                    vision_aspect_ratio=loaded.model.config.vision_aspect_ratio,
                    batch_num_images=inputs.get("batch_num_images"),
                )
            else:
                config = loaded.model.config
                loaded.model.model.get_image_features(
                    inputs["pixel_values"],
                    vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy,
                )
    assert counted < sum(per_sample)
    assert counted == pytest.approx(counter.get_total_flops(), rel=0.01)


# -- arguments and statistics ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"keep_units": 0}, r"keep_units=0 must be >= 1"),
        ({"keep_units": "two"}, r"keep_units='two' must be a whole number"),
        ({"keep_units": 2, "method": "random"}, r"keep_units=2 ranks units by the guide's importance"),
        ({"keep_global_view": "false"}, r"keep_global_view=False applies to unit selection; give keep_units"),
        ({"keep_units": 1, "keep_global_view": "maybe"}, r"keep_global_view='maybe' must be true or false"),
        ({"skip_units": "sometimes"}, r"skip_units='sometimes' must be true or false"),
        ({"skip_units": True, "method": "large_only"}, r"skip_units=true: method='large_only'"),
    ],
)
def test_bad_unit_arguments_fail_before_loading(kwargs, message):
    from lmms_sgl.lmms.args import parse_model_args

    with pytest.raises(ValueError, match=message):
        parse_model_args(pretrained="big", guide="small", **kwargs)


def test_unit_arguments_and_schedule(models_dir):
    from lmms_sgl.lmms.args import check_schedule, parse_model_args

    args = parse_model_args(pretrained="big", guide="small", keep_units="2")
    assert (args.settings.keep_units, args.settings.keep_global_view) == (2, True)
    assert (args.settings.prune_layer, args.settings.keep_ratio) == (0.0, 1.0)  # whole units, no more
    assert args.settings.skips_units(48)
    at_zero = parse_model_args(pretrained="big", guide="small", prune_layer=0, keep_ratio=0.09)
    assert at_zero.settings.skips_units(48) and not SGLSettings(prune_layer=0.2).skips_units(48)
    off = parse_model_args(pretrained="big", guide="small", prune_layer=0, skip_units="false")
    assert not off.settings.skips_units(48)
    asked = parse_model_args(pretrained="big", guide="small", prune_layer=0.2, skip_units="true")
    with pytest.raises(ValueError, match=r"skip_units=true: prune_layer=0.2 gives K=9 of 48 layers"):
        check_schedule(asked, 48)
    with pytest.raises(
        ValueError, match=r"'llava' \(LLaVA-1.5\) checkpoint, which encodes each image as one"
    ):
        LlavaFamily().check_unit_selection(str(models_dir / "llava-large"))
    LlavaFamily().check_unit_selection(str(models_dir / "llava-ov-large"))  # crops: accepted


def test_vision_units_ratio_sums_over_samples():
    from lmms_sgl.reporting.stats import RunStats, format_table

    stats = RunStats.empty()
    for total, encoded, reached in ((7, 3, True), (3, 3, True), (5, 1, False)):
        record = SampleRecord(
            "t", total, reached_large=reached, vision_units=total, vision_units_encoded=encoded
        )
        stats.add(record.as_dict())
    summary = stats.summary()
    assert summary["overall"]["vision_units_ratio"] == pytest.approx(6 / 10)  # the exited sample is out
    assert "vision_units_ratio" in format_table(summary)
