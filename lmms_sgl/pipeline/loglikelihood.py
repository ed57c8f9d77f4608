"""Log-likelihood requests (multiple choice): the continuation's loss under the pruned large model.

No answer is generated, so the guide ranks the visual tokens from its prompt alone (one forward)
and no sample exits. The score is what lmms-eval's own models return: the mean negative
log-likelihood per continuation token and whether the continuation is the greedy one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method import cost
from lmms_sgl.method.importance import AttentionRecorder, prompt_rows_from_last_visual, visual_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.stages import staged_generation_flops, staged_token_ratio
from lmms_sgl.method.transfer import layout_text
from lmms_sgl.pipeline import accounting, vision_units
from lmms_sgl.pipeline.keep_plans import KeepPlanner
from lmms_sgl.pipeline.records import GuideScores, Sample, SampleRecord


def with_continuation(prompt_inputs: dict, continuation_ids: torch.Tensor) -> dict:
    """A one-sample prompt's model inputs followed by text tokens: ``input_ids`` and every other
    per-token tensor grow (a text token's type is 0, e.g. Qwen-VL's ``mm_token_type_ids``, which
    its multimodal RoPE reads), the attention mask covers everything."""
    prompt_ids = prompt_inputs["input_ids"]
    inputs = dict(prompt_inputs)
    for key, value in prompt_inputs.items():
        if key not in ("input_ids", "attention_mask") and value.shape == prompt_ids.shape:
            inputs[key] = torch.cat([value, torch.zeros_like(continuation_ids, dtype=value.dtype)], dim=1)
    input_ids = torch.cat([prompt_ids, continuation_ids], dim=1)
    return {**inputs, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def guide_prompt_importance(guide: LoadedVLM, sample: Sample) -> tuple[GuideScores, float]:
    """Importance from the guide's prompt alone (one forward, no answer), and its FLOPs."""
    inputs = guide.family.build_batch(guide, [sample.prompt])
    visual = guide.visual_mask(inputs["input_ids"])
    rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"])
    recorder = AttentionRecorder(rows, visual_mask=visual)
    with recorder.active(), torch.no_grad():
        guide.model(**inputs, use_cache=False, logits_to_keep=1)
    length, n_visual = inputs["input_ids"].shape[1], int(visual.sum())
    flops = (
        accounting.vision_cost(guide, inputs, [sample.prompt], [n_visual])[0]
        + cost.prefill_flops(guide.text_shape, length)
        + cost.recording_flops(guide.text_shape, length, int(rows.sum()), 0)
    )
    values = visual_scores(recorder.prefill, visual.to(recorder.prefill.device))[0]
    return GuideScores(values, guide.family.visual_boxes(guide, inputs, [sample.prompt])[0]), flops


def score_continuation(
    scorer: LoadedVLM,
    large: LoadedVLM,
    settings: SGLSettings,
    planner: KeepPlanner,
    sample: Sample,
    continuation: str,
    prune: bool,
    guide_importance: Callable[[Sample], tuple[GuideScores, float]],
) -> tuple[tuple[float, bool], SampleRecord]:
    """``(loss, is_greedy)`` of ``continuation`` after the prompt, scored by ``scorer`` (the large
    model, or the guide for ``guide_only``), pruned by ``planner`` when ``prune``."""
    record = SampleRecord(sample.task, sample.doc_id)
    start = time.perf_counter()
    text = scorer.family.prompt_text(scorer, sample.prompt)
    prompt_inputs = scorer.family.encode(scorer, [text], sample.prompt.images, sample.prompt.videos)
    continuation_ids = scorer.tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids
    continuation_ids = continuation_ids.to(scorer.device)
    inputs = with_continuation(prompt_inputs, continuation_ids)
    input_ids = inputs["input_ids"]
    context_length = prompt_inputs["input_ids"].shape[1]
    visual = scorer.visual_mask(input_ids)
    n_visual = int(visual.sum())
    prune = prune and scorer is large and n_visual > 0
    plan, guide_flops, use = None, 0.0, None
    with torch.no_grad():
        if prune:
            scores = None
            if planner.method.guided:
                guide_start = time.perf_counter()
                importance, guide_flops = guide_importance(sample)
                record.guide_seconds = time.perf_counter() - guide_start
                record.extra["guide_layout"] = layout_text(importance.boxes)
                scores = [importance]
            fastv_rows = torch.zeros_like(visual)
            fastv_rows[:, context_length - 1] = True  # FastV's query: the last context token
            with planner.pruned([sample], [record], inputs, visual, scores, fastv_rows) as pruner:
                logits = scorer.model(**inputs, use_cache=False).logits
                plan, use = pruner.plan, planner.unit_use
        else:
            logits = scorer.model(**inputs, use_cache=False).logits
    positions = torch.arange(context_length - 1, input_ids.shape[1] - 1, device=logits.device)
    if plan is not None:
        positions = plan.slot_of()[0].to(logits.device)[positions]
    logprobs = torch.log_softmax(logits[0, positions].float(), dim=-1)
    targets = input_ids[0, context_length:]
    loss = -float(logprobs.gather(1, targets[:, None]).mean())
    greedy = bool((logprobs.argmax(-1) == targets).all())
    record.reached_large = scorer is large
    elapsed = time.perf_counter() - start - record.guide_seconds
    if scorer is large:
        record.large_seconds = elapsed
    else:  # guide_only scores with the guide
        record.guide_seconds = elapsed
    if settings.exit_threshold is not None:
        record.extra["exit_not_applied"] = True  # a log-likelihood has no guide answer to exit on
    record.total_visual = n_visual
    record.num_layers = scorer.num_layers
    record.kept_visual = plan.kept_visual[0] if plan is not None else n_visual
    record.layer_k = planner.layer_k if plan is not None else None
    stages = planner.stages(0) if plan is not None else []
    if len(stages) > 1:
        record.extra["stages"] = stages
    if n_visual and record.reached_large:
        record.token_ratio = staged_token_ratio(scorer.num_layers, n_visual, stages)
    length = input_ids.shape[1]
    record.input_tokens = length  # the prompt and the scored continuation
    vision = accounting.vision_cost(scorer, inputs, [sample.prompt], [n_visual])[0]
    if use is None and scorer is large:
        use = vision_units.full_use(scorer.family.visual_units(scorer, inputs, [sample.prompt]), [vision])
    vision_units.record_use(record, use[0] if use else None)
    encoded = vision if not use or use[0] is None else use[0].vision_flops
    selection = planner.selection_flops(0, length, n_visual) if plan is not None else 0.0
    record.flops = (
        guide_flops
        + encoded
        + staged_generation_flops(scorer.text_shape, length, n_visual, 0, stages, logits=length)
        + selection
    )
    if scorer is large:  # the unpruned reference scores exactly these inputs
        record.flops_large_alone = vision + cost.prefill_flops(scorer.text_shape, length, logits=length)
    else:
        record.flops_large_alone = accounting.large_prefill_flops(large, sample, continuation_ids.shape[1])
    return (loss, greedy), record
