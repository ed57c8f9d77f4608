"""Run-level FLOPs against a named reference (issue 37, item 3): ``flops_reference`` prices the
unpruned large model at the reference layout (by default the large model's own defaults), so a
downsampled run (``max_tiles=1``, a smaller ``max_pixels``) is placed against the full layout.

Oracle: a downsampled run's ``flops_ratio_reference`` equals its ``tflops`` over the
``tflops_large_alone`` of a plain run at the default layout on the same samples (answers of equal
length: a scripted InternVL large model, one-token answers for Qwen-VL)."""

from __future__ import annotations

import pytest
from PIL import Image

from lmms_sgl.factory import build as factory
from lmms_sgl.families import InternVLFamily, Prompt
from lmms_sgl.lmms.args import parse_model_args
from lmms_sgl.lmms.sgl_internvl2 import SGLInternVL2
from lmms_sgl.lmms.sgl_llava import SGLLlava
from lmms_sgl.lmms.sgl_qwen2_vl import SGLQwen2VL
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import GenerationSettings, Sample, SGLPipeline
from lmms_sgl.reporting.stats import RunStats, format_table
from tests import helpers

one_thread = pytest.fixture(scope="module", autouse=True)(helpers.one_thread)
GEN = GenerationSettings(max_new_tokens=6)
ONE_TOKEN = GenerationSettings(max_new_tokens=1)


def samples() -> list[Sample]:
    """Wide and tall images (several tiles at the default layout), a plain one, and text only."""
    specs = [
        ("What color is the circle?", [Image.new("RGB", (1300, 500), (200, 20, 20))]),
        ("Is it?", [Image.new("RGB", (448, 448), (20, 20, 200))]),
        ("How many objects?", [Image.new("RGB", (400, 1100), (20, 200, 20))]),
        ("A question without any image?", []),
    ]
    return [Sample("t", i, Prompt(text, images)) for i, (text, images) in enumerate(specs)]


def summary(records) -> dict:
    stats = RunStats.empty()
    for record in records:
        stats.add(record.as_dict())
    return stats.summary()["overall"]


@pytest.fixture(scope="module")
def internvl(models_dir, tmp_path_factory):
    """A scripted large model (the same answer whatever it sees) and the factory guide, served by
    the lmms-eval model: downsampled SGL (1 tile) and the plain large model at its default layout."""
    large = factory.save_scripted(
        "internvl-large", "a small blue circle", tmp_path_factory.mktemp("reference")
    )
    guide = models_dir / "internvl-guide"
    common = {"pretrained": str(large), "dtype": "float32", "device": "cpu"}
    downsampled = SGLInternVL2(**common, guide=str(guide), max_tiles=1, keep_ratio=0.3)
    plain = SGLInternVL2(**common, method="large_only")
    return downsampled, plain


def test_downsampled_run_is_priced_against_the_default_layout(internvl):
    downsampled, plain = internvl
    assert downsampled.reference_family is not None and downsampled.reference_family.tiles == 12
    assert plain.reference_family is None  # the run's own layout is the default one
    records = downsampled.pipeline.generate(samples(), GEN)
    alone = plain.pipeline.generate(samples(), GEN)
    lengths = [r.output_tokens for r in records]
    assert lengths == [r.output_tokens for r in alone] and min(lengths) >= 2  # the scripted answer
    # one tile against three or more and a thumbnail
    assert records[0].total_visual == 256 and alone[0].total_visual > 3 * 256
    for record, reference in zip(records, alone, strict=True):
        assert record.flops_reference == reference.flops_large_alone
    mine, theirs = summary(records), summary(alone)
    assert mine["flops_ratio_reference"] == pytest.approx(
        mine["tflops"] / theirs["tflops_large_alone"], rel=1e-12
    )
    # the one-tile run is cheap next to the large model at the default layout
    assert mine["flops_ratio_reference"] < 0.6 * mine["flops_ratio"]
    assert "flops_ratio_reference" in format_table({"overall": mine})
    assert downsampled.reference_layout_text() == "max_tiles=12"


def test_loglikelihood_is_priced_against_the_default_layout(internvl):
    downsampled, plain = internvl
    sample = samples()[0]
    _, record = downsampled.pipeline.loglikelihood(sample, " blue")
    _, reference = plain.pipeline.loglikelihood(sample, " blue")
    assert record.flops_reference == reference.flops_large_alone > record.flops_large_alone


def test_run_at_the_reference_layout_gives_equal_ratios(internvl, models_dir):
    """Equal layouts, equal ratios: the short cut (no reference) and the priced path alike."""
    downsampled, plain = internvl
    records = plain.pipeline.generate(samples(), GEN)
    mine = summary(records)
    assert mine["flops_ratio_reference"] == mine["flops_ratio"] == 1.0
    large, guide = downsampled.pipeline.large, downsampled.pipeline.guide
    settings = SGLSettings(prune_layer=0.5, keep_ratio=0.3)
    priced = SGLPipeline(large, guide, settings, reference=InternVLFamily(max_tiles=1).view(large))
    records = priced.generate(samples(), GEN)
    assert all(r.flops_reference == r.flops_large_alone > 0 for r in records)
    mine = summary(records)
    assert mine["flops_ratio_reference"] == mine["flops_ratio"]
    explicit = SGLInternVL2(pretrained=str(models_dir / "internvl-large"), method="large_only", max_tiles=12)
    assert explicit.reference_family is None  # max_tiles=12 is the -hf default: the same layout
    run = SGLInternVL2(
        pretrained=str(models_dir / "internvl-large"), method="large_only", max_tiles=1, flops_reference="run"
    )
    assert run.reference_family is None and run.reference_layout_text() == "max_tiles=1"
    chosen = SGLInternVL2(
        pretrained=str(models_dir / "internvl-large"), method="large_only", max_tiles=1, reference_max_tiles=6
    )
    assert chosen.reference_family.tiles == 6


def test_qwen_smaller_max_pixels_is_priced_against_the_default_bounds(models_dir):
    path = str(models_dir / "qwen2.5-vl-large")
    small = SGLQwen2VL(pretrained=path, method="large_only", max_pixels=28 * 28 * 4)
    plain = SGLQwen2VL(pretrained=path, method="large_only")
    assert small.reference_family is not None and plain.reference_family is None
    records = small.pipeline.generate(samples(), ONE_TOKEN)
    alone = plain.pipeline.generate(samples(), ONE_TOKEN)
    assert records[0].total_visual < alone[0].total_visual
    assert [r.flops_reference for r in records] == [r.flops_large_alone for r in alone]
    mine, theirs = summary(records), summary(alone)
    assert mine["flops_ratio"] == 1.0
    assert mine["flops_ratio_reference"] == pytest.approx(
        mine["tflops"] / theirs["tflops_large_alone"], rel=1e-12
    )


def test_records_of_older_versions_have_no_reference_figure():
    stats = RunStats.empty()
    old = {
        "task": "t", "exited": False, "reached_large": True, "fallback": None, "token_ratio": 1.0,
        "total_visual": 1, "flops": 2.0, "flops_large_alone": 4.0, "guide_seconds": 0.0,
        "large_seconds": 0.0, "output_tokens": 1,
    }  # fmt: skip
    stats.add(old)
    assert stats.summary()["overall"]["flops_ratio_reference"] is None
    stats.add({**old, "flops": 1.0, "flops_reference": 10.0})
    assert stats.summary()["overall"]["flops_ratio_reference"] == 0.1  # only the priced sample


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"flops_reference": "full"}, r"flops_reference='full' is not one of \('default', 'run'\)"),
        (
            {"flops_reference": "run", "reference_max_tiles": 6},
            r"reference_max_tiles=6 sets the reference layout of flops_reference=default; "
            r"flops_reference='run' prices the run's own layout",
        ),
        ({"reference_max_tiles": 0}, r"reference_max_tiles=0 must be >= 1"),
        (
            {"reference_min_pixels": 5000, "reference_max_pixels": 4000},
            r"reference_min_pixels=5000 must be <= reference_max_pixels=4000",
        ),
    ],
)
def test_bad_reference_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parse_model_args(pretrained="big", method="large_only", **kwargs)


def test_reference_layout_of_another_family_is_refused_before_loading(models_dir):
    with pytest.raises(
        ValueError, match=r"reference_max_tiles=6: SGLLlava's reference layout arguments are none"
    ):
        SGLLlava(pretrained=str(models_dir / "llava-large"), method="large_only", reference_max_tiles=6)
    with pytest.raises(
        ValueError,
        match=r"reference_max_pixels=1000: SGLInternVL2's reference layout arguments are reference_max_tiles",
    ):
        SGLInternVL2(
            pretrained=str(models_dir / "internvl-large"), method="large_only", reference_max_pixels=1000
        )
    with pytest.raises(
        ValueError, match=r"reference_max_pixels=100 is below one merged patch.*reference_max_pixels >= 784"
    ):
        SGLQwen2VL(
            pretrained=str(models_dir / "qwen2.5-vl-large"), method="large_only", reference_max_pixels=100
        )
