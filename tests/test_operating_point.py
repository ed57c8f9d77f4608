"""Pricing an operating point at the bundled real pairs (``lmms_sgl.costs.operating_point``).

The per-method stages and selection work are checked against the pipeline's records in
``tests/test_method_baselines.py``; here: the pairs, the guide's share and the exit rate.
"""

from __future__ import annotations

import pytest

from lmms_sgl.costs.methods import guide_flops
from lmms_sgl.costs.operating_point import OperatingPoint, point_flops, point_ratio, real_pair


@pytest.fixture(scope="module", params=["internvl", "llava"])
def pair(request):
    return real_pair(request.param)


def test_real_pairs_are_priced_at_one_unit_layouts():
    assert real_pair("internvl").large.layout.visual_tokens == 256  # one 448-pixel tile
    assert real_pair("llava").large.layout.visual_tokens == 27 * 27  # SigLIP's base image, no crops
    assert (
        real_pair("internvl").large.text.num_layers == 48 and real_pair("llava").large.text.num_layers == 80
    )


def test_guide_share_and_keep_ratio_one(pair):
    guide = guide_flops(pair.guide, pair.work, consistency=False)  # no exit threshold: no pass
    alone = point_flops(pair, OperatingPoint("large_only"))
    assert point_ratio(pair, OperatingPoint("guide_only")) == pytest.approx(guide / alone)
    assert point_ratio(pair, OperatingPoint("random", 1, 1.0)) == pytest.approx(1.0)
    assert point_flops(pair, OperatingPoint("sgl", 2, 1.0)) == pytest.approx(alone + guide)


def test_exit_weights_only_the_large_model_and_pays_the_consistency_pass(pair):
    guide = guide_flops(pair.guide, pair.work, consistency=False)
    stay = point_flops(pair, OperatingPoint("sgl", 0, 0.09)) - guide
    priced = point_flops(pair, OperatingPoint("sgl", 0, 0.09, exit_rate=0.3))
    scored = guide_flops(pair.guide, pair.work, consistency=True)
    assert scored > guide and priced == pytest.approx(scored + 0.7 * stay)
    assert point_ratio(pair, OperatingPoint("sgl", 0, 0.09)) < point_ratio(
        pair, OperatingPoint("sgl", 0, 0.35)
    )


def test_bad_operating_points_are_refused(pair):
    with pytest.raises(ValueError, match="only a method that runs the guide exits"):
        point_flops(pair, OperatingPoint("divprune", 0, 0.09, exit_rate=0.3))
    with pytest.raises(ValueError, match="needs a keep_ratio"):
        point_flops(pair, OperatingPoint("sgl", 1))
    with pytest.raises(ValueError, match="allowed: internvl, llava"):
        real_pair("qwen")
