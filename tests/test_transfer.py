"""Guidance across resolutions: token boxes per family, the geometric mapping, the guide's own layout
through the pipeline, and its model arguments (factory checkpoints, in-process)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt, QwenVLFamily
from lmms_sgl.lmms.args import parse_model_args
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.method.selection import keep_count, plan_from_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes, overlap, transfer_importance
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline

LOAD = {"dtype": torch.float32, "device_map": "cpu", "text_attention": ATTENTION_NAME}
SIZES = [(896, 448), (300, 500), (1000, 250), (100, 90)]
GEN = GenerationSettings.from_gen_kwargs({"max_new_tokens": 3})


@pytest.fixture(scope="module")
def loaded(models_dir):
    """One guide checkpoint per layout kind, each under the family instances the tests need."""

    def load(family, name):
        return family.load(str(models_dir / name), **LOAD)

    return {
        "internvl-1": load(InternVLFamily(max_tiles=1), "internvl-guide"),
        "internvl-6": load(InternVLFamily(max_tiles=6), "internvl-guide"),
        "llava": load(LlavaFamily(), "llava-guide"),
        "llava-ov": load(LlavaFamily(), "llava-ov-guide"),
        "llava-ov-1crop": load(LlavaFamily(max_crops=1), "llava-ov-guide"),
        "qwen2-vl": load(QwenVLFamily(min_pixels=4 * 784, max_pixels=64 * 784), "qwen2-vl-guide"),
    }


def boxes_of(model, prompts: list[Prompt]) -> list[TokenBoxes]:
    inputs = model.family.build_batch(model, prompts)
    out = model.family.visual_boxes(model, inputs, prompts)
    for boxes in out:
        assert not isinstance(boxes, BoxesUnavailable), boxes
    return out


def assert_tiles_once(boxes: TokenBoxes, image: int, view: int) -> tuple[float, float, float, float]:
    """The view's area tokens overlap nowhere and fill their bounding box; returns that box."""
    members = (boxes.image == image) & (boxes.view == view) & ~boxes.newline
    cells = boxes.boxes[members]
    shared = overlap(cells, cells)
    shared.fill_diagonal_(0)
    assert float(shared.max()) == 0.0
    x0, y0 = float(cells[:, 0].min()), float(cells[:, 1].min())
    x1, y1 = float(cells[:, 2].max()), float(cells[:, 3].max())
    assert float(boxes.areas()[members].sum()) == pytest.approx((x1 - x0) * (y1 - y0), rel=1e-9)
    return x0, y0, x1, y1


@pytest.mark.parametrize(
    "name", ["internvl-1", "internvl-6", "llava", "llava-ov", "llava-ov-1crop", "qwen2-vl"]
)
def test_boxes_cover_each_image_exactly_once_per_tile_set(loaded, name):
    model = loaded[name]
    images = [Image.new("RGB", size) for size in SIZES]
    prompts = [Prompt("q", [image]) for image in images] + [Prompt("two", images[:2])]
    for prompt, boxes in zip(prompts, boxes_of(model, prompts), strict=True):
        for index, image in enumerate(prompt.images):
            width, height = image.size
            for view in boxes.view[boxes.image == index].unique().tolist():
                x0, y0, x1, y1 = assert_tiles_once(boxes, index, view)
                if name == "llava":  # the centre crop of the shortest-edge resize
                    side = min(width, height)
                    assert (x1 - x0, y1 - y0) == pytest.approx((side, side), rel=1e-2)  # resize rounds
                elif name.startswith("llava-ov") and view == 1:  # unpad_image may drop edge cells
                    assert (x0, y0) >= (0, 0) and (x1, y1) <= (width, height)
                    assert (x1 - x0) * (y1 - y0) >= 0.75 * width * height
                else:
                    assert (x0, y0, x1, y1) == (0.0, 0.0, width, height)
            newline = boxes.newline & (boxes.image == index)
            assert float(boxes.areas()[newline].sum()) == 0.0
        if name.startswith("llava-ov"):  # one newline per row of the crop grid
            assert int(boxes.newline.sum()) > 0 and not bool(boxes.newline[:64].any())


def test_internvl_tokens_are_row_major_through_the_models_pixel_shuffle(loaded):
    """The per-tile token order the boxes assume is the one the model's own pixel shuffle makes."""
    model = loaded["internvl-1"].model
    patches = 448 // 14
    rows, cols = torch.meshgrid(torch.arange(patches), torch.arange(patches), indexing="ij")
    features = torch.stack([rows, cols], dim=-1).float().reshape(1, patches, patches, 2)
    shuffled = model.model.pixel_shuffle(features, scale_factor=model.config.downsample_ratio)
    tokens = shuffled.reshape(-1, 4, 2)  # each token: its 2 x 2 source patches (row, col)
    side = patches // 2
    for t in range(side * side):
        assert set(tokens[t, :, 0].long().tolist()) == {2 * (t // side), 2 * (t // side) + 1}
        assert set(tokens[t, :, 1].long().tolist()) == {2 * (t % side), 2 * (t % side) + 1}


@pytest.mark.parametrize("name", ["internvl-6", "llava-ov", "llava"])
def test_identical_layouts_give_the_keep_sets_of_index_transfer(loaded, name):
    model = loaded[name]
    prompts = [Prompt("q", [Image.new("RGB", size)]) for size in SIZES[:3]]
    inputs = model.family.build_batch(model, prompts)
    visual = inputs["input_ids"] == model.image_token_id
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(int(n), generator=generator) for n in visual.sum(1)]
    boxes = model.family.visual_boxes(model, inputs, prompts)
    mapped = [transfer_importance(s, b, b) for s, b in zip(scores, boxes, strict=True)]
    assert all(torch.equal(m, s) for m, s in zip(mapped, scores, strict=True))
    for ratio in (0.35, 0.09):
        index = plan_from_scores(scores, visual, inputs["attention_mask"], ratio)
        geometric = plan_from_scores(mapped, visual, inputs["attention_mask"], ratio)
        assert torch.equal(index.index, geometric.index) and torch.equal(index.valid, geometric.valid)


@pytest.mark.parametrize(("guide", "large"), [("internvl-1", "internvl-6"), ("llava-ov-1crop", "llava-ov")])
def test_a_score_peaked_on_one_object_maps_onto_that_object_only(loaded, guide, large):
    image = Image.new("RGB", (896, 448))
    prompt = [Prompt("q", [image])]
    guide_boxes, large_boxes = boxes_of(loaded[guide], prompt)[0], boxes_of(loaded[large], prompt)[0]
    # the object's box, on cell edges of every grid of both models (multiples of 112 px)
    region = torch.tensor([[224.0, 112.0, 560.0, 336.0]], dtype=torch.float64)

    def covering(boxes: TokenBoxes) -> torch.Tensor:
        return ~boxes.newline & (overlap(boxes.boxes, region)[:, 0] > 0)

    inside = covering(guide_boxes)
    assert torch.equal(overlap(guide_boxes.boxes, region)[inside, 0], guide_boxes.areas()[inside])
    scores = torch.where(inside, 1.0, 0.0).float()
    mapped = transfer_importance(scores, guide_boxes, large_boxes)
    on_object = covering(large_boxes)
    assert bool((mapped[on_object] > 0).all()) and int(on_object.sum()) > int(inside.sum())
    assert not bool(mapped[~on_object & ~large_boxes.newline].any())  # newlines: their row's mean
    assert len(mapped) == len(large_boxes) and len(mapped) != len(scores)


def wide_samples() -> list[Sample]:
    images = [Image.new("RGB", (896, 448), (30, 30, 30)), Image.new("RGB", (448, 896), (200, 30, 30))]
    return [
        Sample("t", 0, Prompt("What color is the circle?", images[:1])),
        Sample("t", 1, Prompt("Two pictures?", images)),
    ]


@pytest.fixture(scope="module")
def wide_pair(models_dir):
    """InternVL large model tiling 896 x 448 images into 2 tiles + thumbnail, and its guide at the
    same layout (``None``) and at one tile (``1``)."""
    large = InternVLFamily(max_tiles=2).load(str(models_dir / "internvl-large"), **LOAD)
    guides = {
        tiles: large.family.for_guide(guide_max_tiles=tiles).load(
            str(models_dir / "internvl-guide"), argument="guide", **LOAD
        )
        for tiles in (None, 1)
    }
    return large, guides


def test_a_one_tile_guide_steers_a_multi_tile_large_model_without_fallback(wide_pair):
    large, guides = wide_pair
    settings = SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.09)
    runs = {}
    for tiles, guide in guides.items():
        runs[tiles] = SGLPipeline(large, guide, settings).generate(wide_samples()[1:], GEN)
    for same, low in zip(runs[None], runs[1], strict=True):
        assert low.fallback is None and low.reached_large
        assert low.extra["transfer"] == "geometric" and "transfer" not in same.extra
        assert low.kept_visual == keep_count(low.total_visual, 0.09) == same.kept_visual
        assert low.extra["guide_flops"] < same.extra["guide_flops"] and low.flops < same.flops
        assert low.flops_large_alone == same.flops_large_alone
    layouts = "2x1 tiles + thumbnail (768); 1x2 tiles + thumbnail (768)"
    assert runs[1][0].extra["guide_layout"] == "1x1 tiles (256); 1x1 tiles (256)"
    assert runs[1][0].extra["large_layout"] == layouts == runs[None][0].extra["guide_layout"]
    assert runs[1][0].total_visual == 2 * 768


def test_boxes_that_cannot_be_derived_fall_back_with_the_reason(wide_pair, monkeypatch):
    large, guides = wide_pair
    guide = guides[1]

    def unknown(*args, **kwargs):  # a processor attribute the family does not find
        raise AttributeError("simulated unknown processor")

    monkeypatch.setattr(guide.family, "image_boxes", unknown)
    settings = SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.2)
    record = SGLPipeline(large, guide, settings).generate(wide_samples()[:1], GEN)[0]
    assert "AttributeError: simulated unknown processor" in record.fallback and "256" in record.fallback
    assert record.kept_visual == record.total_visual == 768


def test_guide_layout_arguments_are_validated(models_dir):
    args = parse_model_args(pretrained="l", guide="g", guide_max_tiles="1", guide_max_crops="none")
    assert args.guide_layout == {"guide_max_tiles": 1, "guide_max_crops": None}
    with pytest.raises(ValueError, match="guide_max_tiles=0 must be >= 1"):
        parse_model_args(pretrained="l", guide="g", guide_max_tiles=0)
    with pytest.raises(ValueError, match="guide_max_crops='two' must be a whole number"):
        parse_model_args(pretrained="l", guide="g", guide_max_crops="two")
    with pytest.raises(ValueError, match="method='fastv' runs no guide"):
        parse_model_args(pretrained="l", method="fastv", guide_max_tiles=1)
    with pytest.raises(
        ValueError, match="guide_max_crops=2: the internvl family has no separate guide layout"
    ):
        InternVLFamily().for_guide(guide_max_crops=2)
    with pytest.raises(ValueError, match="guide_max_tiles=1: the llava family"):
        LlavaFamily().for_guide(guide_max_tiles=1)
    family = LlavaFamily().for_guide(guide_max_crops=1)
    with pytest.raises(ValueError, match="'llava' checkpoint with a single grid"):
        family.check_checkpoint(str(models_dir / "llava-guide"), "guide")
    assert family.check_checkpoint(str(models_dir / "llava-ov-guide"), "guide") > 0
    with pytest.raises(ValueError, match="no grid pinpoint of so few 112 px crops"):
        LlavaFamily(max_crops=0).check_checkpoint(str(models_dir / "llava-ov-guide"), "guide")


def test_the_resolution_study_asks_lmms_eval_for_the_guide_layout(tmp_path):
    from lmms_sgl.proving import resolution
    from lmms_sgl.proving.points import ratio_stderr

    points = resolution.points(12)
    low = [p for p in points if p.guide_max_tiles == 1]
    assert {p.method for p in low} == {"guide_only", "sgl"} and len(low) == 3
    assert all(
        p.model_args(tmp_path).endswith(",guide_max_tiles=1") and p.key.endswith("-guide1t") for p in low
    )
    same = [p for p in points if p.guide_max_tiles is None and p.method == "sgl"]
    assert all("guide_max_tiles" not in p.model_args(tmp_path) for p in same)
    assert len({p.key for p in points}) == len(points)
    report = tmp_path / "proving_ground.md"
    report.write_text("# head\n")
    for body in ("first", "second"):
        resolution.insert_section(report, [resolution.START, body, resolution.END])
    assert report.read_text() == f"# head\n\n{resolution.START}\nsecond\n{resolution.END}\n"
    assert ratio_stderr([1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.25)


def test_a_rerun_of_the_study_report_keeps_the_resolution_section(tmp_path):
    import json

    from lmms_sgl.proving import resolution, study

    def row(method, ratio=None, tiles=None, accuracy=0.5):
        return {
            "method": method,
            "target_ratio": ratio,
            "guide_max_tiles": tiles,
            "n": 4,
            "accuracy": accuracy,
            "stderr": 0.25,
            "retained": accuracy / 0.5,
            "retained_stderr": 0.1,
            "guide_flops": None if method == "large_only" else (2e6 if tiles is None else 1e6, 0.0),
            "guide_flops_ratio": None if method == "large_only" else 0.2,
            "flops_ratio": 1.0 if method == "large_only" else 0.6,
            "flops_ratio_stderr": 0.0,
            "mapped": 4 if tiles == 1 else 0,
            "fallbacks": 0,
            "gap": 0.0,
            "gap_stderr": 0.1,
        }

    rows = [row("large_only"), row("random", 0.09)] + [
        row("sgl", r, t, 0.25) for r in (0.35, 0.09) for t in (None, 1)
    ]
    data = {"task": study.WIDE_TASK, "limit": 4, "rows": rows, "command": "python -m x --limit 4"}
    (tmp_path / "proving_ground_resolution.json").write_text(json.dumps(data))
    study.write_report(tmp_path, {"summaries": {}, "sweeps": {}, "checks": {}, "wide": []}, "cmd")
    text = (tmp_path / "proving_ground.md").read_text()
    assert text.count(resolution.START) == 1 and text.rstrip().endswith(resolution.END)
    assert "| sgl | 9 | 1 tile | 25.0 |" in text and "python -m x --limit 4" in text


def test_the_resolution_benchmark_reports_its_target_honestly(tmp_path):
    from lmms_sgl.benchmarks import resolution as bench

    def row(config, time_ratio, flops_ratio):
        return {
            "config": config,
            "guide_layout": None,
            "transfer": None,
            "seconds": time_ratio,
            "time_ratio": time_ratio,
            "guide_seconds": 0.0,
            "large_seconds": time_ratio,
            "flops_ratio": flops_ratio,
            "guide_flops_ratio": 0.0,
            "token_ratio": 0.09,
        }

    # judged on the measured time and on the real pair's FLOPs (0.60x for this operating point on
    # InternVL2-2B -> 26B), so a time ratio under the target on the benchmark pair is not enough
    for low in (0.40, 0.30):
        results = {
            "new_tokens": 10,
            "rounds": 5,
            "rows": [
                row("large_only", 1.0, 1.0),
                row("sgl, guide at the large layout", 0.5, 0.32),
                row("sgl, guide at 1 tile", low, 0.2),
            ],
        }
        out = tmp_path / "benchmarks.md"
        bench.insert_section(out, bench.section(results, "cmd"))
        text = out.read_text()
        assert f"measured {low:.2f}x in time and 0.20x in FLOPs on this pair" in text
        assert "the same operating point costs 0.60x in FLOPs" in text and "**not met**" in text
        assert text.count(bench.START) == 1


def test_onevision_images_of_one_group_get_their_padded_base_view_only(loaded):
    """OneVision's processor does not crop the images of a multi-image group (``batch_num_images``):
    each gets its base view, padded to a square, and one newline."""
    model = loaded["llava-ov"]
    images = [Image.new("RGB", (300, 500)), Image.new("RGB", (896, 448))]
    prompt = Prompt("two", images)
    inputs = model.processor(
        images=[images], text=[model.family.prompt_text(model, prompt)], return_tensors="pt", padding=True
    )
    boxes = model.family.visual_boxes(model, inputs, [prompt])[0]
    assert not isinstance(boxes, BoxesUnavailable), boxes
    assert len(boxes) == int((inputs["input_ids"] == model.image_token_id).sum()) == 2 * 65
    for index, image in enumerate(images):
        assert assert_tiles_once(boxes, index, 0) == (0.0, 0.0, *map(float, image.size))
        assert int((boxes.newline & (boxes.image == index)).sum()) == 1


def test_a_one_crop_onevision_guide_steers_its_any_resolution_large_model(models_dir, loaded):
    large = LlavaFamily().load(str(models_dir / "llava-ov-large"), **LOAD)
    guide = loaded["llava-ov-1crop"]
    sample = Sample(
        "t", 0, Prompt("What color is the circle?", [Image.new("RGB", (896, 448), (200, 20, 20))])
    )
    settings = SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.2)
    record = SGLPipeline(large, guide, settings).generate([sample], GEN)[0]
    assert record.fallback is None and record.extra["transfer"] == "geometric"
    assert "1x1 crops" in record.extra["guide_layout"] and "2x1 crops" in record.extra["large_layout"]
    assert record.kept_visual == keep_count(record.total_visual, 0.2) and record.total_visual == 200
