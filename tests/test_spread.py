"""Guided spread selection (``selection=spread``): the rule equals an independent grid reference on
random scores and on every factory layout, radius 0 is top-k, and through the pipeline it batches,
keeps everything at ratio 1, adds no FLOPs and refuses bad arguments before loading."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lmms_sgl.families import InternVLFamily, LlavaFamily, Prompt, QwenVLFamily
from lmms_sgl.lmms.args import parse_model_args
from lmms_sgl.method.importance import ATTENTION_NAME
from lmms_sgl.method.selection import keep_count
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.spread import spread_select
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes
from lmms_sgl.pipeline import SGLPipeline
from tests.test_pipeline import GEN, answers, samples

LOAD = {"dtype": torch.float32, "device_map": "cpu", "text_attention": ATTENTION_NAME}


def lattice(boxes: TokenBoxes) -> torch.Tensor:
    """``[N, 2]`` (row, column) of each token in its (image, view) grid, from the ranks of its
    box's top and left edges among that grid's: the reference's own geometry, not box overlaps."""
    cells = torch.full((len(boxes), 2), -1, dtype=torch.long)
    for key in {(int(i), int(v)) for i, v in zip(boxes.image, boxes.view, strict=True)}:
        members = ((boxes.image == key[0]) & (boxes.view == key[1]) & ~boxes.newline).nonzero().flatten()
        for axis, edge in ((0, 1), (1, 0)):  # row from y0, column from x0
            starts = boxes.boxes[members, edge]
            ranks = torch.searchsorted(torch.unique(starts), starts)
            cells[members, axis] = ranks
    return cells


def reference_spread(
    scores: torch.Tensor, boxes: TokenBoxes, count: int, radius: int, allowed: list[int] | None = None
) -> list[int]:
    """Non-maximum suppression spelled out on cell coordinates: in order of score (ties to the lower
    index) take an allowed token unless a taken one of the same image and view lies within Chebyshev
    distance ``radius``; shrink the radius while the budget is not filled; radius 0 is top-k."""
    cells = lattice(boxes).tolist()
    pool = range(len(scores)) if allowed is None else allowed
    order = sorted(pool, key=lambda t: (-float(scores[t]), t))
    key = [
        None if boxes.newline[t] else (int(boxes.image[t]), int(boxes.view[t]), *cells[t])
        for t in range(len(scores))
    ]
    taken: list[int] = []

    def dilate(token: int, r: int) -> set:
        """The cells within Chebyshev distance ``r`` of ``token``'s cell (none for a newline)."""
        if key[token] is None:
            return set()
        image, view, row, column = key[token]
        steps = range(-r, r + 1)
        return {(image, view, row + dy, column + dx) for dy in steps for dx in steps}

    for r in range(radius, 0, -1):
        blocked = set().union(*(dilate(t, r) for t in taken))
        for token in order:
            if len(taken) == count:
                return sorted(taken)
            if token not in taken and key[token] not in blocked:
                taken.append(token)
                blocked |= dilate(token, r)
    taken += [t for t in order if t not in taken][: count - len(taken)]
    return sorted(taken)


def made_up_boxes() -> TokenBoxes:
    """Two tiles side by side (one view), a thumbnail (another view), a second image with uneven
    cells, and a newline token: the layouts' ingredients."""
    edges = torch.linspace(0, 200, 5, dtype=torch.float64)
    tiles = TokenBoxes.cat(
        [
            TokenBoxes.grid(edges, torch.linspace(0, 200, 5, dtype=torch.float64), 0, 0),
            TokenBoxes.grid(edges + 200, torch.linspace(0, 200, 5, dtype=torch.float64), 0, 0),
        ]
    )
    thumbnail = TokenBoxes.grid(torch.linspace(0, 400, 4), torch.linspace(0, 200, 3), 0, 1)
    newline = TokenBoxes.of(torch.tensor([[0.0, 0.0, 400.0, 200.0]]), 0, 1, newline=True)
    # resized grids are uneven by a pixel or so (LLaVA-OneVision's shrink, Qwen-VL's merged patches)
    uneven = TokenBoxes.grid(
        torch.tensor([0.0, 21.0, 40.0, 61.0, 80.0]), torch.tensor([0.0, 19.0, 40.0, 60.0]), 1, 0
    )
    return TokenBoxes.cat([tiles, thumbnail, newline, uneven])


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3, 0.6])
def test_spread_equals_the_grid_reference_on_random_scores(radius, fraction):
    boxes = made_up_boxes()
    for seed in range(5):
        scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(seed))
        scores[3] = scores[4]  # a tie
        count = keep_count(len(boxes), fraction)
        chosen = spread_select(scores, boxes, count, radius).tolist()
        assert chosen == reference_spread(scores, boxes, count, radius)
        assert len(chosen) == count
        allowed = (torch.arange(len(boxes)) % 3 != 0) & (torch.arange(len(boxes)) < 40)  # e.g. chosen units
        count = keep_count(int(allowed.sum()), fraction)
        within = spread_select(scores, boxes, count, radius, allowed).tolist()
        assert within == reference_spread(scores, boxes, count, radius, allowed.nonzero().flatten().tolist())


def test_radius_zero_is_top_k_and_suppression_spreads():
    boxes = made_up_boxes()
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(3))
    for count in (1, 5, 20, len(boxes)):
        top = torch.sort(torch.topk(scores, count).indices).values
        assert torch.equal(spread_select(scores, boxes, count, 0), top)
    # a peak: top-k keeps the cluster around it, spread keeps one token of it
    peaked = torch.zeros(len(boxes))
    peaked[5], peaked[[0, 1, 4, 6, 9, 10]] = 10.0, 9.0  # token 5 and its 8-neighbourhood (first tile)
    assert set(spread_select(peaked, boxes, 3, 1).tolist()) & {0, 1, 4, 6, 9, 10} == set()


def test_spread_adds_no_matrix_product():
    from torch.utils.flop_counter import FlopCounterMode

    boxes = made_up_boxes()
    with FlopCounterMode(display=False) as counter:
        spread_select(torch.rand(len(boxes)), boxes, 10, 2)
    assert counter.get_total_flops() == 0


@pytest.fixture(scope="module")
def layouts(models_dir):
    """The large checkpoint of every layout: InternVL tiles + thumbnail, LLaVA-1.5, OneVision crops
    (unpadded, newlines), LLaVA-NeXT crops, Qwen2-VL merged patches of any size."""
    return {
        "internvl": InternVLFamily(max_tiles=6).load(str(models_dir / "internvl-large"), **LOAD),
        "llava": LlavaFamily().load(str(models_dir / "llava-large"), **LOAD),
        "llava-ov": LlavaFamily().load(str(models_dir / "llava-ov-large"), **LOAD),
        "llava-next": LlavaFamily().load(str(models_dir / "llava-next-large"), **LOAD),
        "qwen2-vl": QwenVLFamily(min_pixels=4 * 784, max_pixels=64 * 784).load(
            str(models_dir / "qwen2-vl-large"), **LOAD
        ),
    }


@pytest.mark.parametrize("name", ["internvl", "llava", "llava-ov", "llava-next", "qwen2-vl"])
def test_spread_equals_the_reference_on_every_layout(layouts, name):
    loaded = layouts[name]
    prompts = [
        Prompt("Wide?", [Image.new("RGB", (900, 300), "red")]),
        Prompt("Two?", [Image.new("RGB", (300, 500), "blue"), Image.new("RGB", (448, 448), "green")]),
    ]
    inputs = loaded.family.build_batch(loaded, prompts)
    for boxes in loaded.family.visual_boxes(loaded, inputs, prompts):
        assert not isinstance(boxes, BoxesUnavailable), boxes
        scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(len(boxes)))
        for radius, fraction in ((1, 0.09), (2, 0.2), (1, 0.35)):
            count = keep_count(len(boxes), fraction)
            assert spread_select(scores, boxes, count, radius).tolist() == reference_spread(
                scores, boxes, count, radius
            )


@pytest.fixture(scope="module")
def pair(models_dir):
    family = InternVLFamily(max_tiles=6)
    guide = family.load(str(models_dir / "internvl-guide"), **LOAD)
    large = family.load(str(models_dir / "internvl-large"), **LOAD)
    return guide, large


def kept_sets(records) -> list[tuple]:
    return [(r.kept_visual, r.answer) for r in records]


def test_spread_radius_zero_equals_topk_through_the_pipeline(pair):
    guide, large = pair
    common = {"method": "sgl", "prune_layer": 0.0, "keep_ratio": 0.1}
    topk = SGLPipeline(large, guide, SGLSettings(selection="topk", **common)).generate(samples(), GEN)
    zero = SGLPipeline(large, guide, SGLSettings(selection="spread", spread_radius=0, **common)).generate(
        samples(), GEN
    )
    assert answers(zero) == answers(topk)
    assert [r.kept_visual for r in zero] == [r.kept_visual for r in topk]


@pytest.mark.parametrize("prune_layer", [0.0, 0.5])
def test_spread_batch_equals_alone_and_ratio_one_is_unpruned(pair, prune_layer, monkeypatch):
    import lmms_sgl.method.sgl as sgl_module

    guide, large = pair
    chosen: list[list[int]] = []
    original = sgl_module.spread_select

    def spy(scores, boxes, count, radius, allowed=None):
        out = original(scores, boxes, count, radius, allowed)
        chosen.append(out.tolist())
        return out

    monkeypatch.setattr(sgl_module, "spread_select", spy)
    settings = SGLSettings(method="sgl", prune_layer=prune_layer, keep_ratio=0.1, selection="spread")
    pipeline = SGLPipeline(large, guide, settings)
    together = pipeline.generate(samples(), GEN)
    in_batch = list(chosen)
    chosen.clear()
    alone = [pipeline.generate([s], GEN)[0] for s in samples()]
    assert in_batch and in_batch == chosen
    assert answers(together) == answers(alone)
    assert all(r.extra.get("selection") == "spread r=2" for r in together if r.total_visual)
    assert all(r.flops == pytest.approx(a.flops) for r, a in zip(together, alone, strict=True))
    full = SGLPipeline(
        large, guide, SGLSettings(method="sgl", prune_layer=prune_layer, keep_ratio=1.0, selection="spread")
    )
    reference = SGLPipeline(large, None, SGLSettings(method="large_only")).generate(samples(), GEN)
    assert answers(full.generate(samples(), GEN)) == answers(reference)


def test_spread_keeps_unit_selection_and_unit_skipping_working(pair):
    guide, large = pair
    skipped = SGLPipeline(
        large, guide, SGLSettings(method="sgl", prune_layer=0.0, keep_ratio=0.1, selection="spread")
    ).generate(samples()[:1], GEN)[0]
    assert skipped.fallback is None and skipped.kept_visual < skipped.total_visual
    units = SGLPipeline(
        large,
        guide,
        SGLSettings(method="sgl", prune_layer=0.5, keep_ratio=0.3, keep_units=2, selection="spread"),
    ).generate(samples()[:1], GEN)[0]
    assert units.fallback is None and units.extra["units_kept"] >= 2
    assert units.extra["selection"] == "spread r=2"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"selection": "nms"}, r"selection='nms' is not one of \('auto', 'topk', 'spread'\)"),
        ({"selection": "spread", "spread_radius": -1}, r"spread_radius=-1 .*>= 0"),
        (
            {"selection": "topk", "spread_radius": 2},
            r"spread_radius=2 applies to spreading; selection='topk'",
        ),
        ({"method": "fastv", "selection": "spread"}, r"selection='spread' spreads the guide's importance"),
    ],
)
def test_bad_selection_arguments_fail_before_loading(kwargs, message):
    args = {"pretrained": "big", "guide": "small", **kwargs}
    with pytest.raises(ValueError, match=message):
        parse_model_args(**args)


def test_auto_selection_spreads_from_layer_zero_or_at_small_keep_ratios(pair):
    """``selection=auto`` (the default) spreads from layer 0 or up to ``AUTO_SPREAD_MAX_KEEP``, top-k
    otherwise: the same keep sets as the explicit rules, and the resolved rule in the settings."""
    from lmms_sgl.method.spread import AUTO_SPREAD_MAX_KEEP

    assert SGLSettings(keep_ratio=AUTO_SPREAD_MAX_KEEP).token_selection(2) == "spread"
    assert SGLSettings(keep_ratio=0.35).token_selection(0) == "spread"  # from layer 0: spread
    assert SGLSettings(keep_ratio=0.2).token_selection(1) == "topk"
    assert SGLSettings(keep_ratio=0.05, selection="topk").token_selection(0) == "topk"
    assert SGLSettings(method="fastv", keep_ratio=0.05, prune_layer=0.5).selection == "auto"  # no guide: fine
    guide, large = pair
    for layer, keep, rule in ((0.5, 0.08, "spread"), (0.0, 0.3, "spread"), (0.5, 0.3, "topk")):
        common = {"method": "sgl", "prune_layer": layer, "keep_ratio": keep}
        auto = SGLPipeline(large, guide, SGLSettings(**common)).generate(samples(), GEN)
        explicit = SGLPipeline(large, guide, SGLSettings(selection=rule, **common)).generate(samples(), GEN)
        assert [(r.kept_visual, r.answer, r.extra.get("selection")) for r in auto] == [
            (r.kept_visual, r.answer, r.extra.get("selection")) for r in explicit
        ]


def test_spread_without_token_boxes_is_topk_noted_per_sample_and_said_once():
    """Videos (no token boxes): top-k, noted in every sample's record, one warning per reason."""
    from loguru import logger

    from lmms_sgl.method.sgl import spread_mask
    from lmms_sgl.method.transfer import BoxesUnavailable
    from lmms_sgl.pipeline.records import SampleRecord

    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
        records = [SampleRecord(task="t", doc_id=i) for i in range(2)]
        reason = BoxesUnavailable("a video's frames (test)")
        settings = SGLSettings(keep_ratio=0.5, selection="spread")
        masks = [spread_mask(scores, reason, None, record, settings) for record in records]
    finally:
        logger.remove(sink)
    assert all(mask.tolist() == [False, True, True, False] for mask in masks)  # top-k
    assert all("spread impossible: a video's frames (test)" in r.extra["selection"] for r in records)
    assert sum("spread impossible" in m for m in messages) == 1
