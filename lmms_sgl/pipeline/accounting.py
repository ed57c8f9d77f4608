"""Cost records: the FLOPs each step of a sample spent, and what the large model alone would have.

Every figure comes from the analytic formulas of ``lmms_sgl.method.cost`` (checked against
``torch.utils.flop_counter``) applied to the sizes the models really saw, so ``flops_ratio`` compares
the pipeline with the unpruned large model on the same requests and the same answer lengths.
"""

from __future__ import annotations

from lmms_sgl.families.base import LoadedVLM, Prompt
from lmms_sgl.method import cost
from lmms_sgl.method.selection import keep_count
from lmms_sgl.method.stages import Stages, staged_generation_flops
from lmms_sgl.pipeline.records import Sample, SampleRecord


def layout(loaded: LoadedVLM, inputs: dict, samples: list[Sample]) -> tuple[list, list, list]:
    """Per sample: visual-token count, real (unpadded) prompt length, vision-tower FLOPs."""
    n_visual = loaded.visual_mask(inputs["input_ids"]).sum(1).tolist()
    real = inputs["attention_mask"].sum(1).tolist()
    return n_visual, real, vision_cost(loaded, inputs, [s.prompt for s in samples], n_visual)


def vision_cost(loaded: LoadedVLM, inputs: dict, prompts: list[Prompt], n_visual: list[int]) -> list[int]:
    """Vision-tower FLOPs per sample: its images' and its videos'."""
    images = loaded.family.vision_flops(loaded, inputs, [len(p.images) for p in prompts], n_visual)
    videos = loaded.family.video_flops(loaded, inputs, [len(p.videos) for p in prompts])
    return [i + v for i, v in zip(images, videos, strict=True)]


def guide_flops(
    guide: LoadedVLM,
    vision: float,
    prompt: int,
    n_visual: int,
    answer: int,
    recorded_rows: int,
    consistency_ratio: float | None,
) -> float:
    """The guide's generation with importance recording, plus its consistency pass when it ran
    (``consistency_ratio`` not ``None``, :func:`consistency_flops`)."""
    shape = guide.text_shape
    generation = (
        vision
        + cost.generation_flops(shape, prompt, answer)
        + cost.recording_flops(shape, prompt, recorded_rows, max(answer - 1, 0))
    )
    if consistency_ratio is None:
        return generation
    return generation + consistency_flops(guide, prompt, n_visual, answer, consistency_ratio)


def consistency_flops(guide: LoadedVLM, prompt: int, n_visual: int, answer: int, ratio: float) -> float:
    """The guide's consistency pass: one forward over the prompt with only ``ratio`` of its visual
    tokens, followed by the answer, logits at every position."""
    kept = prompt - n_visual + keep_count(n_visual, ratio) + answer
    return cost.prefill_flops(guide.text_shape, kept, logits=kept)


def large_alone_flops(large: LoadedVLM, vision: float, prompt: int, answer: int) -> float:
    """The unpruned large model generating ``answer`` tokens after ``prompt`` tokens."""
    return vision + cost.generation_flops(large.text_shape, prompt, answer)


def pruned_large_flops(
    large: LoadedVLM,
    vision: float,
    prompt: int,
    answer: int,
    n_visual: int,
    stages: Stages,
    selection: float = 0.0,
) -> float:
    """The large model generating ``answer`` tokens with its layers seeing what ``stages`` kept
    (``[(K, kept)]`` for single-layer pruning), plus the method's own ``selection`` work (FastV's
    recorded row, DivPrune's distances...)."""
    return vision + staged_generation_flops(large.text_shape, prompt, n_visual, answer, stages) + selection


def priced_answer(record: SampleRecord) -> int:
    """The answer length the large model alone is priced with: its own answer, or for a sample the
    guide answered, the guide's (at least one token)."""
    return record.output_tokens if record.reached_large else max(record.output_tokens, 1)


def reference_cost(large: LoadedVLM, samples: list[Sample], records: list[SampleRecord]) -> None:
    """FLOPs the unpruned large model would have spent on exited samples (same answer length)."""
    if not samples:
        return
    inputs = large.family.build_batch(large, [s.prompt for s in samples])
    n_visual, real, vision = layout(large, inputs, samples)
    for b, record in enumerate(records):
        record.total_visual = n_visual[b]
        record.flops_large_alone = large_alone_flops(large, vision[b], real[b], priced_answer(record))


def reference_layout_cost(
    reference: LoadedVLM | None, samples: list[Sample], records: list[SampleRecord]
) -> None:
    """``flops_reference`` of generated samples: the unpruned large model at the reference layout
    (``reference``: the large model seen through the reference family; ``None``: the run's own
    layout, so it is ``flops_large_alone``), on the same prompts, with the same answer lengths. No
    forward: the processor builds the reference batch, the analytic formulas price it."""
    priced = [(s, r) for s, r in zip(samples, records, strict=True) if not r.extra.get("failed")]
    for record in records:
        record.flops_reference = (
            record.flops_large_alone if reference is None or record.extra.get("failed") else None
        )
    if reference is None or not priced:
        return
    inputs = reference.family.build_batch(reference, [s.prompt for s, _ in priced])
    n_visual, real, vision = layout(reference, inputs, [s for s, _ in priced])
    for b, (_, record) in enumerate(priced):
        record.flops_reference = large_alone_flops(reference, vision[b], real[b], priced_answer(record))


def large_prefill_flops(large: LoadedVLM, sample: Sample, continuation_tokens: int) -> float:
    """FLOPs of the unpruned large model scoring the same prompt and continuation (used when
    another model scored it, so the large model's own tokenization must be counted)."""
    inputs = large.family.build_batch(large, [sample.prompt])
    n_visual = int(large.visual_mask(inputs["input_ids"]).sum())
    length = inputs["input_ids"].shape[1] + continuation_tokens
    vision = vision_cost(large, inputs, [sample.prompt], [n_visual])[0]
    return vision + cost.prefill_flops(large.text_shape, length, logits=length)
