"""One batch through SGL: guide -> maybe exit -> large model with the keep set applied from layer K.

The pipeline composes the method (``lmms_sgl.method``) with two loaded models of one family
(``lmms_sgl.families``) and returns one :class:`SampleRecord` per sample: the answer, whether the
guide's answer was final, what the large model kept, exit scores, FLOPs and seconds. It knows
nothing of lmms-eval.

Guidance across resolutions: the guide's importance travels with the boxes of the guide's visual
tokens (:class:`GuideScores`); when the large model tiles the images differently, the scores are
mapped onto its tokens by image geometry (``lmms_sgl.method.transfer``). A sample whose boxes cannot
be derived keeps index transfer if the counts match, else falls back (kept all visual tokens).

Robustness: if a batch fails, its samples are retried one by one; a sample that still fails on the
SGL path is answered by the unpruned large model and marked as a fallback with the reason, so one
bad sample never loses the rest of an evaluation.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from loguru import logger

from lmms_sgl.families.base import LoadedVLM, Prompt
from lmms_sgl.method import cost
from lmms_sgl.method.early_exit import exit_score, should_exit
from lmms_sgl.method.fastv import fastv_plan_source, fastv_recorder
from lmms_sgl.method.guide import answer_lengths, consistency_pass, run_guide
from lmms_sgl.method.importance import AttentionRecorder, prompt_rows_from_last_visual, visual_scores
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import keep_count, plan_from_scores, random_scores
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.method.transfer import BoxesUnavailable, TokenBoxes, transfer_importance

# lmms-eval writes its ``fewshot_delimiter`` into every task's ``until`` that has none (gqa, mmvet,
# ...). Its own HF models never stop there (``llava_hf``/``internvl_hf`` ignore ``until``;
# ``qwen2_5_vl`` removes exactly this string), and MM-Vet's step-by-step answers contain blank lines.
LMMS_EVAL_DEFAULT_STOP = "\n\n"


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


@dataclass(frozen=True)
class GuideScores:
    """The guide's importance of one sample, with the boxes of its visual tokens (or why they
    could not be derived)."""

    values: torch.Tensor
    boxes: TokenBoxes | BoxesUnavailable

    def __len__(self) -> int:
        return len(self.values)


def layout_text(boxes: TokenBoxes | BoxesUnavailable) -> str:
    """What the samples log records of a layout: its tiles per image, or why it is unknown."""
    if isinstance(boxes, BoxesUnavailable):
        return f"unknown: {boxes}"
    return "; ".join(boxes.layout)


@dataclass
class Sample:
    task: str
    doc_id: int | str
    prompt: Prompt

    @property
    def key(self) -> int:
        """Stable per-sample key (seeds the random baseline independently of batching and ranks)."""
        return zlib.crc32(f"{self.task}/{self.doc_id}".encode())


@dataclass
class SampleRecord:
    task: str
    doc_id: int | str
    answer: str = ""
    guide_answer: str | None = None
    exited: bool = False
    reached_large: bool = False
    confidence: float | None = None
    consistency: float | None = None
    exit_score: float | None = None
    kept_visual: int | None = None
    total_visual: int | None = None
    layer_k: int | None = None
    num_layers: int | None = None
    token_ratio: float | None = None
    flops: float = 0.0
    flops_large_alone: float = 0.0
    guide_seconds: float = 0.0
    large_seconds: float = 0.0
    output_tokens: int = 0
    fallback: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def truncate_at(text: str, until: tuple[str, ...]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


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


class SGLPipeline:
    """Guide, prune, maybe exit, for batches of samples sharing generation settings."""

    def __init__(self, large: LoadedVLM, guide: LoadedVLM | None, settings: SGLSettings):
        if settings.uses_guide and guide is None:
            raise ValueError(f"method={settings.method!r} needs a guide model")
        self.large, self.guide, self.settings = large, guide, settings
        self.layer_k = settings.layer_k(large.num_layers) if settings.prunes else None
        self.pruner = VisualTokenPruner(large.text_model, self.layer_k) if settings.prunes else None

    @staticmethod
    def _layout(loaded: LoadedVLM, inputs: dict, samples: list[Sample]) -> tuple[list, list, list]:
        """Per sample: visual-token count, real (unpadded) prompt length, vision-tower FLOPs."""
        n_visual = (inputs["input_ids"] == loaded.image_token_id).sum(1).tolist()
        real = inputs["attention_mask"].sum(1).tolist()
        vision = loaded.family.vision_flops(loaded, inputs, [len(s.prompt.images) for s in samples], n_visual)
        return n_visual, real, vision

    @contextmanager
    def _pruned(
        self, samples, records, inputs, visual, scores, fastv_rows=None
    ) -> Iterator[VisualTokenPruner]:
        """The large model with this method's keep plan armed (and FastV's recorder active)."""
        source, recorder = self._plan_source(samples, records, inputs, visual, scores, fastv_rows)
        with ExitStack() as stack:
            stack.enter_context(self.pruner.installed())
            if recorder is not None:
                stack.enter_context(recorder.active())
            self.pruner.arm(source)
            yield self.pruner

    # -- generation ------------------------------------------------------------------------
    def generate(self, samples: list[Sample], gen: GenerationSettings) -> list[SampleRecord]:
        try:
            return self._generate_batch(samples, gen)
        except Exception as error:  # noqa: BLE001 -- isolate the failing sample, never lose the batch
            if len(samples) > 1:
                logger.warning(
                    f"batch of {len(samples)} failed ({type(error).__name__}: {error}); retrying one by one"
                )
                return [record for sample in samples for record in self.generate([sample], gen)]
            reason = f"{type(error).__name__}: {error}"
            logger.warning(
                f"{samples[0].task}/{samples[0].doc_id}: SGL path failed ({reason}); unpruned large model"
            )
            return [self._fallback(samples[0], gen, reason)]

    def _fallback(self, sample: Sample, gen: GenerationSettings, reason: str) -> SampleRecord:
        record = SampleRecord(sample.task, sample.doc_id, fallback=reason)
        try:
            self._run_large([sample], [record], gen, scores=None, prune=False)
        except Exception as error:  # noqa: BLE001 -- reported in the record and counted in the stats
            record.fallback = f"{reason}; unpruned large model failed too: {type(error).__name__}: {error}"
            record.extra["failed"] = True
            logger.error(f"{sample.task}/{sample.doc_id}: no answer ({record.fallback})")
        return record

    def _generate_batch(self, samples: list[Sample], gen: GenerationSettings) -> list[SampleRecord]:
        records = [SampleRecord(s.task, s.doc_id) for s in samples]
        importance = None
        if self.settings.uses_guide:
            importance, exited = self._run_guide(samples, records, gen)
            if self.settings.method == "guide_only":
                exited = [True] * len(records)
            for record, leave in zip(records, exited, strict=True):
                if leave:
                    record.answer, record.exited = record.guide_answer or "", True
        remaining = [i for i, record in enumerate(records) if not record.exited]
        self._reference_cost(
            [s for i, s in enumerate(samples) if records[i].exited], [r for r in records if r.exited]
        )
        if remaining:
            scores = [importance[i] for i in remaining] if importance is not None else None
            self._run_large(
                [samples[i] for i in remaining],
                [records[i] for i in remaining],
                gen,
                scores,
                self.settings.prunes,
            )
        return records

    def _run_guide(self, samples: list[Sample], records: list[SampleRecord], gen: GenerationSettings):
        guide = self.guide
        start = time.perf_counter()
        inputs = guide.family.build_batch(guide, [s.prompt for s in samples])
        visual = inputs["input_ids"] == guide.image_token_id
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
        consistency = consistency_pass(guide.model, guide.text_model, run, self.settings.consistency_ratio)
        scores = exit_score(run.confidence.cpu(), consistency.cpu())
        exited = should_exit(scores, self.settings.exit_threshold).tolist()
        seconds = (time.perf_counter() - start) / len(samples)

        n_visual, real, vision = self._layout(guide, inputs, samples)
        boxes = guide.family.visual_boxes(guide, inputs, [s.prompt for s in samples])
        rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"]).sum(1).tolist()
        shape = guide.text_shape
        for b, record in enumerate(records):
            length = int(run.lengths[b])
            text = guide.tokenizer.decode(run.generated[b, :length], skip_special_tokens=True)
            record.guide_answer = truncate_at(text, gen.until)
            record.confidence = float(run.confidence[b])
            record.consistency = float(consistency[b])
            record.exit_score = float(scores[b])
            record.guide_seconds = seconds
            kept_for_consistency = (
                real[b] - n_visual[b] + keep_count(n_visual[b], self.settings.consistency_ratio)
            )
            guide_flops = (
                vision[b]
                + cost.generation_flops(shape, real[b], length)
                + cost.recording_flops(shape, real[b], rows[b], max(length - 1, 0))
                + cost.prefill_flops(
                    shape, kept_for_consistency + length, logits=kept_for_consistency + length
                )
            )
            record.flops += guide_flops
            record.extra["guide_flops"] = guide_flops
            record.extra["guide_layout"] = layout_text(boxes[b])
            record.output_tokens = length  # replaced by the large model's if it runs
        return [GuideScores(v, box) for v, box in zip(run.importance, boxes, strict=True)], exited

    def _reference_cost(self, samples: list[Sample], records: list[SampleRecord]) -> None:
        """FLOPs the unpruned large model would have spent on exited samples (same answer length)."""
        if not samples:
            return
        inputs = self.large.family.build_batch(self.large, [s.prompt for s in samples])
        n_visual, real, vision = self._layout(self.large, inputs, samples)
        for b, record in enumerate(records):
            record.total_visual = n_visual[b]
            record.flops_large_alone = vision[b] + cost.generation_flops(
                self.large.text_shape, real[b], max(record.output_tokens, 1)
            )

    def _plan_source(self, samples, records, inputs, visual, scores, fastv_rows=None):
        """The keep plan for this method, and the FastV recorder if one must be active.

        ``scores`` (:class:`GuideScores` per sample, or ``None`` to keep everything) are mapped onto
        the large model's tokens (:meth:`_large_scores`); a sample where that is impossible keeps all
        its visual tokens and is marked as a fallback with the reason. ``fastv_rows`` overrides
        FastV's query rows (default: last prompt row).
        """
        attention_mask = inputs["attention_mask"]
        method = self.settings.method
        if method == "fastv":
            recorder = fastv_recorder(attention_mask, self.layer_k, fastv_rows)
            return fastv_plan_source(recorder, visual, attention_mask, self.settings.keep_ratio), recorder
        if method == "random":
            per_sample = random_scores(visual.cpu(), self.settings.seed, [s.key for s in samples])
        else:
            per_sample = []
            counts = visual.sum(1).tolist()
            large_boxes = None
            if scores is not None:
                large_boxes = self.large.family.visual_boxes(self.large, inputs, [s.prompt for s in samples])
            for b, record in enumerate(records):
                if scores is None:
                    per_sample.append(None)
                    continue
                record.extra["large_layout"] = layout_text(large_boxes[b])
                per_sample.append(self._large_scores(scores[b], large_boxes[b], counts[b], record))
        return plan_from_scores(per_sample, visual, attention_mask, self.settings.keep_ratio), None

    @staticmethod
    def _large_scores(
        scores: GuideScores, large: TokenBoxes | BoxesUnavailable, count: int, record: SampleRecord
    ) -> torch.Tensor | None:
        """One score per large visual token: the guide's own when both models tile alike (or the
        boxes are unknown but the counts match: index transfer), else mapped by geometry; ``None``
        (keep everything, a counted fallback) when neither is possible."""
        guide = scores.boxes
        known = not isinstance(guide, BoxesUnavailable) and not isinstance(large, BoxesUnavailable)
        if known and guide.same_layout(large):
            return scores.values
        if known:
            try:
                mapped = transfer_importance(scores.values, guide, large)
            except BoxesUnavailable as error:
                reason = f"geometric transfer failed: {error}"
            else:
                record.extra["transfer"] = "geometric"
                return mapped
        elif len(scores) == count:
            return scores.values
        else:
            unknown = guide if isinstance(guide, BoxesUnavailable) else large
            which = "guide" if unknown is guide else "large model"
            reason = f"{which} token boxes unknown ({unknown})"
        record.fallback = (
            f"layout mismatch: guide has {len(scores)} visual tokens, large model has {count}; "
            f"{reason}; kept all visual tokens"
        )
        logger.warning(f"{record.task}/{record.doc_id}: {record.fallback}")
        return None

    def _run_large(self, samples, records, gen: GenerationSettings, scores, prune: bool) -> None:
        large = self.large
        start = time.perf_counter()
        inputs = large.family.build_batch(large, [s.prompt for s in samples])
        visual = inputs["input_ids"] == large.image_token_id
        extra = {"stop_strings": list(gen.until), "tokenizer": large.tokenizer} if gen.until else {}
        plan = None
        with torch.no_grad():
            if prune:
                with self._pruned(samples, records, inputs, visual, scores) as pruner:
                    sequences = large.model.generate(**inputs, **gen.large_kwargs(), **extra)
                    plan = pruner.plan
            else:
                sequences = large.model.generate(**inputs, **gen.large_kwargs(), **extra)
        seconds = (time.perf_counter() - start) / len(samples)

        prompt_length = inputs["input_ids"].shape[1]
        generated = sequences[:, prompt_length:]
        lengths = answer_lengths(generated, large.stop_token_ids, large.tokenizer, gen.until).tolist()
        n_visual, real, vision = self._layout(large, inputs, samples)
        shape = large.text_shape
        for b, record in enumerate(records):
            text = large.tokenizer.decode(generated[b, : lengths[b]], skip_special_tokens=True)
            record.answer = truncate_at(text, gen.until)
            record.reached_large = True
            if record.guide_answer is not None:  # what _reference_cost would count had it exited
                record.extra["exit_flops_large_alone"] = vision[b] + cost.generation_flops(
                    shape, real[b], max(record.output_tokens, 1)
                )
            record.output_tokens = lengths[b]
            record.large_seconds = seconds
            record.total_visual = n_visual[b]
            record.num_layers = large.num_layers
            alone = vision[b] + cost.generation_flops(shape, real[b], lengths[b])
            record.flops_large_alone = alone
            if plan is None:
                record.kept_visual = n_visual[b]
                record.layer_k = None
                record.flops += alone
            else:
                record.kept_visual = plan.kept_visual[b]
                record.layer_k = self.layer_k
                pruned = real[b] - n_visual[b] + plan.kept_visual[b]
                record.flops += vision[b] + cost.generation_flops(
                    shape, real[b], lengths[b], self.layer_k, pruned
                )
                if self.settings.method == "fastv":  # one recorded row in one layer
                    record.flops += cost.recording_flops(replace(shape, num_layers=1), real[b], 1, 0)
            if n_visual[b]:
                layer_k = record.layer_k or 0  # no plan: every visual token kept, ratio 1
                record.token_ratio = cost.measured_token_ratio(
                    layer_k, large.num_layers, record.kept_visual, n_visual[b]
                )

    # -- log-likelihood --------------------------------------------------------------------
    def loglikelihood(self, sample: Sample, continuation: str) -> tuple[tuple[float, bool], SampleRecord]:
        """``(loss, is_greedy)`` of ``continuation`` after the prompt, with the large model pruned by
        the guide's prompt-only importance (no generation, no exit). ``loss`` is the mean negative
        log-likelihood per continuation token, what lmms-eval's own models return: its
        multiple-choice scoring picks the choice with the lowest value. If the SGL path fails, the
        unpruned large model answers and the record says why.

        The prompt ends with the chat template's generation prompt, so the continuation is scored
        as the answer the model would generate there: lmms-eval's ``target_delimiter`` (a leading
        space) is removed first, else every choice starts with a token no answer starts with.
        """
        continuation = continuation.lstrip()
        try:
            return self._loglikelihood(sample, continuation, self.settings.prunes)
        except Exception as error:  # noqa: BLE001 -- fall back, counted in the statistics
            if not self.settings.prunes:
                raise
            reason = f"{type(error).__name__}: {error}"
            logger.warning(f"{sample.task}/{sample.doc_id}: SGL log-likelihood failed ({reason}); unpruned")
            result, record = self._loglikelihood(sample, continuation, prune=False)
            record.fallback = reason
            return result, record

    def _loglikelihood(self, sample: Sample, continuation: str, prune: bool):
        record = SampleRecord(sample.task, sample.doc_id)
        scorer = self.guide if self.settings.method == "guide_only" else self.large
        start = time.perf_counter()
        text = scorer.family.prompt_text(scorer, sample.prompt)
        prompt_inputs = scorer.family.encode(scorer, [text], sample.prompt.images)
        continuation_ids = scorer.tokenizer(
            continuation, add_special_tokens=False, return_tensors="pt"
        ).input_ids
        continuation_ids = continuation_ids.to(scorer.device)
        inputs = with_continuation(prompt_inputs, continuation_ids)
        input_ids = inputs["input_ids"]
        context_length = prompt_inputs["input_ids"].shape[1]
        visual = input_ids == scorer.image_token_id
        n_visual = int(visual.sum())
        prune = prune and scorer is self.large and n_visual > 0
        plan, guide_flops = None, 0.0
        with torch.no_grad():
            if prune:
                scores = None
                if self.settings.method == "sgl":
                    guide_start = time.perf_counter()
                    importance, guide_flops = self._guide_prompt_importance(sample)
                    record.guide_seconds = time.perf_counter() - guide_start
                    record.extra["guide_layout"] = layout_text(importance.boxes)
                    scores = [importance]
                fastv_rows = torch.zeros_like(visual)
                fastv_rows[:, context_length - 1] = True  # FastV's query: the last context token
                with self._pruned([sample], [record], inputs, visual, scores, fastv_rows) as pruner:
                    logits = scorer.model(**inputs, use_cache=False).logits
                    plan = pruner.plan
            else:
                logits = scorer.model(**inputs, use_cache=False).logits
        positions = torch.arange(context_length - 1, input_ids.shape[1] - 1, device=logits.device)
        if plan is not None:
            positions = plan.slot_of()[0].to(logits.device)[positions]
        logprobs = torch.log_softmax(logits[0, positions].float(), dim=-1)
        targets = input_ids[0, context_length:]
        loss = -float(logprobs.gather(1, targets[:, None]).mean())
        greedy = bool((logprobs.argmax(-1) == targets).all())
        record.reached_large = scorer is self.large
        elapsed = time.perf_counter() - start - record.guide_seconds
        if scorer is self.large:
            record.large_seconds = elapsed
        else:  # guide_only scores with the guide
            record.guide_seconds = elapsed
        if self.settings.exit_threshold is not None:
            record.extra["exit_not_applied"] = True  # a log-likelihood has no guide answer to exit on
        record.total_visual = n_visual
        record.num_layers = scorer.num_layers
        record.kept_visual = plan.kept_visual[0] if plan is not None else n_visual
        record.layer_k = self.layer_k if plan is not None else None
        if n_visual and record.reached_large:
            record.token_ratio = cost.measured_token_ratio(
                record.layer_k or 0, scorer.num_layers, record.kept_visual, n_visual
            )
        length = input_ids.shape[1]
        vision = scorer.family.vision_flops(scorer, inputs, [len(sample.prompt.images)], [n_visual])[0]
        pruned = length - n_visual + record.kept_visual
        record.flops = (
            guide_flops
            + vision
            + cost.prefill_flops(scorer.text_shape, length, record.layer_k, pruned, logits=length)
        )
        if scorer is self.large:  # the unpruned reference scores exactly these inputs
            record.flops_large_alone = vision + cost.prefill_flops(scorer.text_shape, length, logits=length)
        else:
            record.flops_large_alone = self._large_prefill_flops(sample, continuation_ids.shape[1])
        return (loss, greedy), record

    def _guide_prompt_importance(self, sample: Sample) -> tuple[GuideScores, float]:
        """Importance from the guide's prompt alone (one forward, no answer), for log-likelihood,
        and the FLOPs that forward cost."""
        guide = self.guide
        inputs = guide.family.build_batch(guide, [sample.prompt])
        visual = inputs["input_ids"] == guide.image_token_id
        rows = prompt_rows_from_last_visual(visual, inputs["attention_mask"])
        recorder = AttentionRecorder(rows, visual_mask=visual)
        with recorder.active(), torch.no_grad():
            guide.model(**inputs, use_cache=False, logits_to_keep=1)
        length, n_visual = inputs["input_ids"].shape[1], int(visual.sum())
        flops = (
            guide.family.vision_flops(guide, inputs, [len(sample.prompt.images)], [n_visual])[0]
            + cost.prefill_flops(guide.text_shape, length)
            + cost.recording_flops(guide.text_shape, length, int(rows.sum()), 0)
        )
        values = visual_scores(recorder.prefill, visual.to(recorder.prefill.device))[0]
        return GuideScores(values, guide.family.visual_boxes(guide, inputs, [sample.prompt])[0]), flops

    def _large_prefill_flops(self, sample: Sample, continuation_tokens: int) -> float:
        """FLOPs of the unpruned large model scoring the same prompt and continuation (used when
        another model scored it, so the large model's own tokenization must be counted)."""
        large = self.large
        inputs = large.family.build_batch(large, [sample.prompt])
        n_visual = int((inputs["input_ids"] == large.image_token_id).sum())
        length = inputs["input_ids"].shape[1] + continuation_tokens
        vision = large.family.vision_flops(large, inputs, [len(sample.prompt.images)], [n_visual])[0]
        return vision + cost.prefill_flops(large.text_shape, length, logits=length)
