"""One operating point (method, K, keep ratio, exit rate) priced at a pair of real checkpoints.

The proving ground measures accuracy on small trained pairs whose guide costs 14-20 % of the large
model; on the pairs users run, the guide is a smaller share (InternVL2-2B is 7.6 % of 26B). So each
measured point is also priced, from the bundled ``config.json`` files alone, at the same operating
point on a real pair: the method's own stages and selection work
(:meth:`~lmms_sgl.method.registry.KeepMethod.planned_stages`, ``planned_selection_flops``, the
formulas its run-time records use), the guide's run when the method reads a guide, and the large
model weighted by the share of requests the guide does not answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmms_sgl.costs.layout import base_image_layout, internvl_layout
from lmms_sgl.costs.methods import Side, Workload, guide_flops
from lmms_sgl.costs.sources import read_checkpoint
from lmms_sgl.method.cost import TransformerShape
from lmms_sgl.method.registry import method_named
from lmms_sgl.method.stages import staged_generation_flops


@dataclass(frozen=True)
class PricedPair:
    """A guide and a large model at one image layout, and the request they serve."""

    label: str
    guide: Side
    large: Side
    work: Workload


@dataclass(frozen=True)
class OperatingPoint:
    """What a run was asked to do, on the pair it is priced at.

    Attributes:
        method: a ``method=`` name.
        layer_k: the large model's layer K on this pair (``None``: unpruned).
        keep_ratio: the keep ratio from layer K on.
        exit_rate: share of requests the guide answers alone (the large model never runs).
    """

    method: str
    layer_k: int | None = None
    keep_ratio: float | None = None
    exit_rate: float = 0.0


def _side(source: str, layout_of) -> Side:
    checkpoint = read_checkpoint(source, "--large")
    config = checkpoint.config
    return Side(source, TransformerShape.from_text_config(config.text_config), layout_of(config))


# The proving scenes are one 448-pixel tile (InternVL) and one image (LLaVA), so each family is priced
# at its real pair's one-unit layout: InternVL2-2B -> 26B on one tile (256 visual tokens), the
# LLaVA-OneVision 0.5B -> 72B pair on its base image alone (729 tokens, no crops).
REAL_PAIRS = {
    "internvl": (
        "InternVL2-2B → 26B, one tile", "InternVL2-2B", "InternVL2-26B", lambda c: internvl_layout(c, 1)
    ),
    "llava": (
        "LLaVA-OV 0.5B → 72B, base image",
        "llava-onevision-qwen2-0.5b-ov-hf",
        "llava-onevision-qwen2-72b-ov-hf",
        base_image_layout,
    ),
}  # fmt: skip


def real_pair(family: str, work: Workload | None = None) -> PricedPair:
    """The bundled real pair of a proving family (64 prompt text tokens, 8 answer tokens by default,
    as ``lmms-sgl-cost``'s defaults)."""
    if family not in REAL_PAIRS:
        raise ValueError(f"family={family!r}: allowed: {', '.join(REAL_PAIRS)}")
    label, guide, large, layout = REAL_PAIRS[family]
    return PricedPair(label, _side(guide, layout), _side(large, layout), work or Workload(64, 8))


def point_flops(pair: PricedPair, point: OperatingPoint) -> float:
    """Expected FLOPs of one request at ``point`` on ``pair``."""
    method = method_named(point.method)
    if point.exit_rate and not method.uses_guide:
        raise ValueError(
            f"exit_rate={point.exit_rate}: only a method that runs the guide exits; method={point.method!r}"
        )
    large, work = pair.large, pair.work
    n_visual = large.layout.visual_tokens
    prompt = work.prompt_tokens + n_visual
    shape = large.text
    stages: list[tuple[int, int]] = []
    selection = 0.0
    if method.prunes and point.layer_k is not None:
        if point.keep_ratio is None:
            raise ValueError(f"method={point.method!r} at K={point.layer_k} needs a keep_ratio")
        stages = method.planned_stages(shape.num_layers, point.layer_k, n_visual, point.keep_ratio)
        selection = method.planned_selection_flops(shape, prompt, n_visual, stages)
    large_run = (
        large.layout.vision_flops
        + staged_generation_flops(shape, prompt, n_visual, work.answer_tokens, stages)
        + selection
    )
    if method.answers_with_guide:
        return guide_flops(pair.guide, work, consistency=False)
    # the consistency pass runs only where an exit threshold reads its score
    paid = guide_flops(pair.guide, work, consistency=point.exit_rate > 0) if method.uses_guide else 0.0
    return paid + (1.0 - point.exit_rate) * large_run


def point_ratio(pair: PricedPair, point: OperatingPoint) -> float:
    """``point_flops`` as a share of the large model alone on the same request."""
    return point_flops(pair, point) / point_flops(pair, OperatingPoint("large_only"))
