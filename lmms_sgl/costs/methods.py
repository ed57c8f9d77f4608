"""The analytic cost of each method for one request, split into what a user pays for.

Every number comes from ``lmms_sgl.method.cost`` with the accounting the pipeline records at run time
(``lmms_sgl/pipeline/accounting.py``): the guide pays its vision tower, its greedy generation, the
recording attention (prompt rows from the last visual token, every fed-back token) and, in the rows
with an exit rate (the only runs that read the exit score), the consistency pass; the large model
pays its vision tower, its prefill with layers ``>= K`` on the kept tokens, and its decode steps;
FastV adds its one recorded row. Assumption: the prompt's text follows the image (so every text
token is a recorded guide row), as in single-image VQA prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmms_sgl.costs.layout import ImageLayout
from lmms_sgl.method.cost import (
    PAPER_PRESETS,
    TransformerShape,
    decode_flops,
    prefill_flops,
    prune_layer_index,
    recording_flops,
)
from lmms_sgl.method.selection import keep_count

FASTV_LABEL = "FastV"


@dataclass(frozen=True)
class Side:
    """One model at one image layout."""

    name: str
    text: TransformerShape
    layout: ImageLayout


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int  # text tokens of the prompt (chat template + question)
    answer_tokens: int  # generated tokens (the answer length)
    consistency_ratio: float = 0.05  # the guide's consistency pass (exit rows), as SGLSettings' default


@dataclass(frozen=True)
class Options:
    """Which operating points to add beyond the presets."""

    units: int | None = None  # unit selection: keep this many local units
    keep_global: bool = True  # ... plus the thumbnail / base image
    small_guide: Side | None = None  # the guide at a cheaper layout (e.g. one tile)
    exit_rate: float | None = None  # fraction of requests answered by the guide alone


@dataclass(frozen=True)
class Cost:
    """Expected FLOPs of one request under one method (exit already weighted in)."""

    method: str
    setting: str
    guide: float
    vision: float
    prefill: float
    decode: float
    units: str = ""  # large vision units encoded / total

    @property
    def large(self) -> float:
        return self.vision + self.prefill + self.decode

    @property
    def total(self) -> float:
        return self.guide + self.large


def guide_flops(guide: Side, work: Workload, consistency: bool) -> int:
    """What the pipeline records for the guide's run (``SGLPipeline._run_guide``); ``consistency``:
    with its consistency pass, which runs only when an exit threshold (or calibration) reads it."""
    shape, visual = guide.text, guide.layout.visual_tokens
    prompt, answer = work.prompt_tokens + visual, work.answer_tokens
    generation = (
        guide.layout.vision_flops
        + prefill_flops(shape, prompt)
        + decode_flops(shape, prompt, answer)
        + recording_flops(shape, prompt, work.prompt_tokens + 1, max(answer - 1, 0))
    )
    if not consistency:
        return generation
    kept = prompt - visual + keep_count(visual, work.consistency_ratio) + answer
    return generation + prefill_flops(shape, kept, logits=kept)


def large_flops(
    large: Side, work: Workload, vision: int, layer_k: int | None, kept_visual: int | None
) -> tuple[int, int, int]:
    """(vision, prefill, decode) of the large model; layers ``>= layer_k`` see ``kept_visual`` tokens."""
    prompt = work.prompt_tokens + large.layout.visual_tokens
    pruned = None if layer_k is None else work.prompt_tokens + kept_visual
    shape, answer = large.text, work.answer_tokens
    return (
        vision,
        prefill_flops(shape, prompt, layer_k, pruned),
        decode_flops(shape, prompt, answer, layer_k, pruned),
    )


def _units_text(encoded: int, layout: ImageLayout) -> str:
    return f"{encoded}/{len(layout.units)}"


def best_case_units(layout: ImageLayout, kept: int) -> int:
    """Fewest units that can hold ``kept`` tokens (the kept tokens concentrated in the largest units):
    ``ceil(kept / tokens_per_unit)`` when units are equal."""
    total = 0
    for count, tokens in enumerate(sorted((u.tokens for u in layout.units), reverse=True), start=1):
        total += tokens
        if total >= kept:
            return count
    return len(layout.units)


def best_case_vision(layout: ImageLayout, count: int) -> int:
    return sum(sorted((u.flops for u in layout.units), reverse=True)[:count])


def selected_units(layout: ImageLayout, n: int, keep_global: bool) -> tuple[int, int, int]:
    """(units, tokens, vision FLOPs) of unit selection keeping ``n`` local units (+ the global view)."""
    chosen = list(layout.local_units[:n]) + (list(layout.global_units) if keep_global else [])
    return len(chosen), sum(u.tokens for u in chosen), sum(u.flops for u in chosen)


def guided_rows(
    large: Side, guide: Side, work: Workload, options: Options, exits: bool
) -> list[tuple[str, str, int, tuple, str]]:
    """(method, setting, guide FLOPs, large (vision, prefill, decode), units) of every guided point;
    ``exits``: with early exit, so the guide pays its consistency pass."""
    layers, layout = large.text.num_layers, large.layout
    visual, full_vision = layout.visual_tokens, layout.vision_flops
    paid = guide_flops(guide, work, consistency=exits)
    every = _units_text(len(layout.units), layout)
    rows = []
    for ratio, (prune_layer, keep_ratio) in sorted(PAPER_PRESETS.items(), reverse=True):
        k = prune_layer_index(layers, prune_layer)
        kept = keep_count(visual, keep_ratio)
        setting = f"{round(ratio * 100)} %: K={k}, r={keep_ratio}"
        rows.append(("SGL", setting, paid, large_flops(large, work, full_vision, k, kept), every))
    kept = keep_count(visual, 0.09)
    rows.append(
        (
            "SGL K=0",
            f"9 %: K=0, r=0.09, {kept} kept",
            paid,
            large_flops(large, work, full_vision, 0, kept),
            every,
        )
    )
    if layout.skippable:
        best = best_case_units(layout, kept)
        vision = best_case_vision(layout, best)
        rows.append(
            (
                "SGL K=0 + unit skip",
                "best case: kept tokens in fewest units",
                paid,
                large_flops(large, work, vision, 0, kept),
                _units_text(best, layout),
            )
        )
        rows.append(
            (
                "SGL K=0 + unit skip",
                "worst case: a kept token in every unit",
                paid,
                large_flops(large, work, full_vision, 0, kept),
                every,
            )
        )
        if options.units is not None:
            count, tokens, vision = selected_units(layout, options.units, options.keep_global)
            view = " + global view" if options.keep_global else ""
            rows.append(
                (
                    "SGL unit selection",
                    f"{options.units} units{view}, {tokens} tokens from layer 0",
                    paid,
                    large_flops(large, work, vision, 0, tokens),
                    _units_text(count, layout),
                )
            )
    return rows


def method_costs(large: Side, guide: Side, work: Workload, options: Options) -> list[Cost]:
    """Every method and preset for one request; ratios are taken against the first row (large alone)."""
    layers, layout = large.text.num_layers, large.layout
    every = _units_text(len(layout.units), layout)
    alone = large_flops(large, work, layout.vision_flops, None, None)
    costs = [Cost("large only", "all visual tokens", 0, *alone, every)]
    for side in [guide] + ([options.small_guide] if options.small_guide else []):
        costs.append(
            Cost(
                "guide only",
                guide_layout_text(side),
                guide_flops(side, work, consistency=False),  # nothing reads an exit score
                0,
                0,
                0,
                "0/" + str(len(layout.units)),
            )
        )
    for ratio, (prune_layer, keep_ratio) in sorted(PAPER_PRESETS.items(), reverse=True):
        k = prune_layer_index(layers, prune_layer)
        if k < 1:
            continue  # FastV ranks at layer K-1
        kept = keep_count(layout.visual_tokens, keep_ratio)
        vision, prefill, decode = large_flops(large, work, layout.vision_flops, k, kept)
        prompt = work.prompt_tokens + layout.visual_tokens
        prefill += recording_flops(replace(large.text, num_layers=1), prompt, 1, 0)
        costs.append(
            Cost(
                FASTV_LABEL,
                f"{round(ratio * 100)} %: K={k}, r={keep_ratio}",
                0,
                vision,
                prefill,
                decode,
                every,
            )
        )
    guides = [guide] + ([options.small_guide] if options.small_guide else [])
    exits = [None] + ([options.exit_rate] if options.exit_rate is not None else [])
    for side in guides:
        for exit_rate in exits:
            for method, setting, paid, (vision, prefill, decode), units in guided_rows(
                large, side, work, options, exits=exit_rate is not None
            ):
                suffix = f"; guide {guide_layout_text(side)}" if side is not guide else ""
                stay = 1.0 if exit_rate is None else 1.0 - exit_rate
                if exit_rate is not None:
                    suffix += f"; exit {exit_rate:.0%}"
                costs.append(
                    Cost(method, setting + suffix, paid, stay * vision, stay * prefill, stay * decode, units)
                )
    return costs


def guide_layout_text(side: Side) -> str:
    return side.layout.description.split(",")[0]
