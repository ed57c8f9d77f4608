"""Generation requests: the task's generation settings, the guide's step and the large model's step.

The guide answers greedily while its attention to the visual tokens is recorded, then, when
something reads them (an exit threshold, or ``record_exit_score`` for calibration), its consistency
pass and exit score are computed; the large model answers with the keep plan armed (or unpruned).
Each step fills the sample records it is given; which samples take which step is decided in
:mod:`lmms_sgl.pipeline.flow`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from loguru import logger
from transformers import LogitsProcessorList

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method.early_exit import exit_score, should_exit
from lmms_sgl.method.guide import answer_lengths, consistency_pass, run_guide
from lmms_sgl.method.importance import prompt_rows_from_last_visual
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.stages import staged_token_ratio
from lmms_sgl.method.transfer import layout_text
from lmms_sgl.pipeline import accounting, vision_units
from lmms_sgl.pipeline.drafting import GuideDrafts, drafted_generate, drafts_from_run, record_drafting
from lmms_sgl.pipeline.keep_plans import KeepPlanner
from lmms_sgl.pipeline.records import GuideScores, Sample, SampleRecord

# lmms-eval writes its ``fewshot_delimiter`` into every task's ``until`` that has none (gqa, mmvet,
# ...). Its own HF models never stop there (``llava_hf``/``internvl_hf`` ignore ``until``;
# ``qwen2_5_vl`` removes exactly this string), and MM-Vet's step-by-step answers contain blank lines.
LMMS_EVAL_DEFAULT_STOP = "\n\n"

# What a record says when the guide's consistency pass did not run (``exit_score`` stays ``None``).
SKIPPED_EXIT_SCORE = {
    True: "no exit_threshold: the consistency pass did not run (record_exit_score=true runs it)",
    False: "the guide answers every request: no consistency pass, no exit score",
}


@dataclass(frozen=True)
class GenerationSettings:
    """The task's generation kwargs, validated (lmms-eval's HF models use the same defaults).

    ``until`` keeps the task's stop strings except lmms-eval's injected default ``"\n\n"``, which
    is dropped: lmms-eval writes it into the task's own ``generation_kwargs``, so an explicit
    ``"\n\n"`` cannot be told apart from the injected one (as in lmms-eval's ``qwen2_5_vl``).
    """

    max_new_tokens: int = 1024
    until: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict) -> GenerationSettings:
        kwargs = dict(gen_kwargs)  # never mutate the request's dict
        until = kwargs.pop("until", ())
        until = (until,) if isinstance(until, str) else tuple(until or ())
        until = tuple(stop for stop in until if stop and stop != LMMS_EVAL_DEFAULT_STOP)
        settings = cls(
            max_new_tokens=int(kwargs.pop("max_new_tokens", 1024)),
            until=until,
            temperature=float(kwargs.pop("temperature", 0.0) or 0.0),
            top_p=kwargs.pop("top_p", None),
            num_beams=int(kwargs.pop("num_beams", 1) or 1),
        )
        kwargs.pop("do_sample", None)  # implied by temperature, as in lmms-eval's HF models
        if settings.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={settings.max_new_tokens} must be >= 1")
        return settings

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def large_kwargs(self) -> dict:
        """``generate`` kwargs of the large model; ``min_new_tokens=1`` as the official code, so an
        answer is never empty (the guide's run sets the same)."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": 1,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return kwargs


def truncate_at(text: str, until: tuple[str, ...]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def guide_step(
    guide: LoadedVLM,
    settings: SGLSettings,
    samples: list[Sample],
    records: list[SampleRecord],
    gen: GenerationSettings,
    drafting: bool = False,
) -> tuple[list[GuideScores], list[bool]]:
    """The guide answers every sample; its records get the answer, exit scores and FLOPs.
    Returns each sample's importance (with its token boxes, and with ``drafting`` the batch's
    :class:`GuideDrafts`) and whether it may exit."""
    start = time.perf_counter()
    inputs = guide.family.build_batch(guide, [s.prompt for s in samples])
    visual = guide.visual_mask(inputs["input_ids"])
    run = run_guide(
        guide.model,
        guide.text_model,
        inputs,
        visual,
        gen.max_new_tokens,
        guide.stop_token_ids,
        guide.tokenizer,
        gen.until,
    )
    consistency = scores = None
    exited = [False] * len(samples)
    consistency_start = time.perf_counter()
    if settings.scores_exit:
        consistency = consistency_pass(guide.model, guide.text_model, run, settings.consistency_ratio)
        scores = exit_score(run.confidence.cpu(), consistency.cpu())
        exited = should_exit(scores, settings.exit_threshold).tolist()
    end = time.perf_counter()
    seconds, consistency_seconds = (end - start) / len(samples), (end - consistency_start) / len(samples)

    n_visual, real, vision = accounting.layout(guide, inputs, samples)
    boxes = guide.family.visual_boxes(guide, inputs, [s.prompt for s in samples])
    rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"]).sum(1).tolist()
    for b, record in enumerate(records):
        length = int(run.lengths[b])
        text = guide.tokenizer.decode(run.generated[b, :length], skip_special_tokens=True)
        record.guide_answer = truncate_at(text, gen.until)
        record.confidence = float(run.confidence[b])
        record.guide_seconds = seconds
        ratio = settings.consistency_ratio if settings.scores_exit else None
        flops = accounting.guide_flops(guide, vision[b], real[b], n_visual[b], length, rows[b], ratio)
        if scores is None:
            record.extra["exit_score_skipped"] = SKIPPED_EXIT_SCORE[settings.keep_method.guided]
        else:
            record.consistency = float(consistency[b])
            record.exit_score = float(scores[b])
            record.extra["consistency_flops"] = accounting.consistency_flops(
                guide, real[b], n_visual[b], length, ratio
            )
            record.extra["consistency_seconds"] = consistency_seconds  # part of guide_seconds
        record.flops += flops
        record.extra["guide_flops"] = flops
        record.extra["guide_layout"] = layout_text(boxes[b])
        record.output_tokens = length  # replaced by the large model's if it runs
        record.input_tokens = real[b]
    drafts = drafts_from_run(guide, run) if drafting else None
    return [GuideScores(v, box, drafts) for v, box in zip(run.importance, boxes, strict=True)], exited


class NonFiniteScores:
    """A logits processor that notes, per sample, the first answer step whose next-token scores
    hold NaN or +inf (corrupt weights or inputs; -inf is the other processors' own masking). Such an
    answer is garbage, usually empty: the sample becomes a counted failure with the reason."""

    def __init__(self, rows_per_sample: int):
        self.rows_per_sample = rows_per_sample
        self.first_step: dict[int, int] = {}
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        broken = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1)
        for row in broken.nonzero().flatten().tolist():
            self.first_step.setdefault(row // self.rows_per_sample, self.step)
        self.step += 1
        return scores

    def mark(self, records: list[SampleRecord]) -> None:
        for sample, step in self.first_step.items():
            record = records[sample]
            record.extra["failed"] = True
            record.answer = ""
            record.fallback = (
                f"the large model's next-token scores are not finite (NaN or inf) from answer token "
                f"{step + 1}: its weights or this sample's inputs hold non-finite values"
            )
            logger.error(f"{record.task}/{record.doc_id}: {record.fallback}")


def large_step(
    large: LoadedVLM,
    planner: KeepPlanner,
    samples: list[Sample],
    records: list[SampleRecord],
    gen: GenerationSettings,
    scores: list[GuideScores] | None,
    prune: bool,
    drafts: GuideDrafts | None = None,
) -> None:
    """The large model answers every sample, pruned by the planner's keep plan when ``prune``;
    with ``drafts`` (greedy settings only) it verifies the guide's drafts instead of decoding
    token by token (``lmms_sgl.pipeline.drafting``), with the same answers."""
    start = time.perf_counter()
    inputs = large.family.build_batch(large, [s.prompt for s in samples])
    visual = large.visual_mask(inputs["input_ids"])
    extra = {"stop_strings": list(gen.until), "tokenizer": large.tokenizer} if gen.until else {}
    plan, use, drafted = None, None, None
    watch = NonFiniteScores(gen.num_beams)

    def answer():
        nonlocal drafted
        if drafts is None:
            processors = LogitsProcessorList([watch])
            return large.model.generate(**inputs, **gen.large_kwargs(), **extra, logits_processor=processors)
        tokens = planner.settings.draft_tokens
        drafted = drafted_generate(large, inputs, drafts, gen.max_new_tokens, tokens, gen.until)
        return drafted.sequences

    with torch.no_grad():
        if prune:
            with planner.pruned(samples, records, inputs, visual, scores) as pruner:
                sequences = answer()
                plan, use = pruner.plan, planner.unit_use
        else:
            sequences = answer()
    seconds = (time.perf_counter() - start) / len(samples)

    prompt_length = inputs["input_ids"].shape[1]
    generated = sequences[:, prompt_length:]
    lengths = answer_lengths(generated, large.stop_token_ids, large.tokenizer, gen.until).tolist()
    n_visual, real, vision = accounting.layout(large, inputs, samples)
    if use is None:
        units = large.family.visual_units(large, inputs, [s.prompt for s in samples])
        use = vision_units.full_use(units, vision)
    for b, record in enumerate(records):
        vision_units.record_use(record, use[b])
        text = large.tokenizer.decode(generated[b, : lengths[b]], skip_special_tokens=True)
        record.answer = truncate_at(text, gen.until)
        record.reached_large = True
        if record.guide_answer is not None:  # what the reference cost would count had it exited
            record.extra["exit_flops_large_alone"] = accounting.large_alone_flops(
                large, vision[b], real[b], max(record.output_tokens, 1)
            )
        record.output_tokens = lengths[b]
        record.input_tokens = real[b]
        record.large_seconds = seconds
        record.total_visual = n_visual[b]
        record.num_layers = large.num_layers
        alone = accounting.large_alone_flops(large, vision[b], real[b], lengths[b])
        record.flops_large_alone = alone
        if plan is None:
            record.kept_visual = n_visual[b]
            record.layer_k = None
            large_flops = alone
        else:
            record.kept_visual = plan.kept_visual[b]
            record.layer_k = planner.layer_k
            stages = planner.stages(b)
            if len(stages) > 1:
                record.extra["stages"] = stages
            large_flops = accounting.pruned_large_flops(
                large,
                vision[b] if use[b] is None else use[b].vision_flops,
                real[b],
                lengths[b],
                n_visual[b],
                stages,
                planner.selection_flops(b, real[b], n_visual[b]),
            )
        if drafted is not None:  # every verification forward instead of one decode step per token
            pruned = real[b] - n_visual[b] + record.kept_visual
            encoded = vision[b] if use[b] is None else use[b].vision_flops
            large_flops = record_drafting(
                large, drafts.guide, drafted, record, b, encoded, real[b], record.layer_k, pruned
            )
        record.flops += large_flops
        if n_visual[b]:
            stages = [] if plan is None else planner.stages(b)  # no plan: every visual token kept
            record.token_ratio = staged_token_ratio(large.num_layers, n_visual[b], stages)
    watch.mark(records)
