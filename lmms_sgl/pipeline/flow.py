"""One batch through SGL: guide -> maybe exit -> large model with the keep set applied from layer K.

This is the one place that decides a sample's way: which samples the guide answers, which exit,
which reach the large model, and what happens when a step fails. The steps themselves live beside
it: :mod:`.generation` (guide and large-model steps), :mod:`.loglikelihood` (multiple choice),
:mod:`.keep_plans` (each method's keep plan), :mod:`.accounting` (FLOPs records). It knows nothing
of lmms-eval.

Guidance across resolutions: the guide's importance travels with the boxes of the guide's visual
tokens; when the large model tiles the images differently, the scores are mapped onto its tokens by
image geometry (``lmms_sgl.method.transfer``).

Robustness: if a batch fails, its samples are retried one by one; a sample that still fails on the
SGL path is answered by the unpruned large model and marked as a fallback with the reason, so one
bad sample never loses the rest of an evaluation.
"""

from __future__ import annotations

from loguru import logger

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method.settings import SGLSettings
from lmms_sgl.pipeline import accounting
from lmms_sgl.pipeline.drafting import (
    GuideDrafts,
    check_shared_tokenizer,
    draft_only_step,
    not_applied_reason,
    note_not_applied,
)
from lmms_sgl.pipeline.generation import GenerationSettings, guide_step, large_step
from lmms_sgl.pipeline.keep_plans import KeepPlanner
from lmms_sgl.pipeline.loglikelihood import guide_prompt_importance, score_continuation
from lmms_sgl.pipeline.records import GuideScores, Sample, SampleRecord


class SGLPipeline:
    """Guide, prune, maybe exit, for batches of samples sharing generation settings."""

    def __init__(
        self,
        large: LoadedVLM,
        guide: LoadedVLM | None,
        settings: SGLSettings,
        reference: LoadedVLM | None = None,
    ):
        """``reference``: the large model at the layout ``flops_reference`` prices it alone at
        (``None``: the run's own layout)."""
        if settings.needs_guide and guide is None:
            raise ValueError(f"method={settings.method!r} (draft={settings.draft!r}) needs a guide model")
        if settings.draft is not None:
            check_shared_tokenizer(large, guide)
        self.large, self.guide, self.settings, self.reference = large, guide, settings, reference
        self.planner = KeepPlanner(large, settings)
        self.layer_k, self.pruner = self.planner.layer_k, self.planner.pruner

    # -- generation ------------------------------------------------------------------------
    def generate(self, samples: list[Sample], gen: GenerationSettings) -> list[SampleRecord]:
        records = self._generate(samples, gen)
        self._price_reference(samples, records)
        return records

    def _price_reference(self, samples: list[Sample], records: list[SampleRecord]) -> None:
        """``flops_reference`` of every record (batch, else one by one); a sample whose reference
        batch cannot be built keeps ``None`` and says why (its answer is not affected)."""
        try:
            accounting.reference_layout_cost(self.reference, samples, records)
        except Exception as error:  # noqa: BLE001 -- pricing must never lose an answer
            if len(samples) > 1:
                for sample, record in zip(samples, records, strict=True):
                    self._price_reference([sample], [record])
                return
            reason = f"{type(error).__name__}: {error}"
            records[0].extra["flops_reference_failed"] = reason
            logger.warning(f"{samples[0].task}/{samples[0].doc_id}: no flops_reference ({reason})")

    def _generate(self, samples: list[Sample], gen: GenerationSettings) -> list[SampleRecord]:
        try:
            return self._generate_batch(samples, gen)
        except Exception as error:  # noqa: BLE001 -- isolate the failing sample, never lose the batch
            if len(samples) > 1:
                logger.warning(
                    f"batch of {len(samples)} failed ({type(error).__name__}: {error}); retrying one by one"
                )
                return [record for sample in samples for record in self._generate([sample], gen)]
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
        drafting = self.settings.draft is not None
        if drafting and (reason := not_applied_reason(gen.do_sample, gen.num_beams)):
            note_not_applied(records, reason)
            drafting = False
        if self.settings.uses_guide:
            importance, exited = self._run_guide(samples, records, gen, drafting)
            if self.planner.method.answers_with_guide:
                exited = [True] * len(records)
            for record, leave in zip(records, exited, strict=True):
                if leave:
                    record.answer, record.exited = record.guide_answer or "", True
        remaining = [i for i, record in enumerate(records) if not record.exited]
        accounting.reference_cost(
            self.large,
            [s for i, s in enumerate(samples) if records[i].exited],
            [r for r in records if r.exited],
        )
        if remaining:
            scores = [importance[i] for i in remaining] if importance is not None else None
            chosen = [samples[i] for i in remaining]
            drafts = None
            if drafting and importance is not None:  # exited samples need no verification
                drafts = importance[0].drafts.rows(remaining)
            elif drafting:  # large_only: the guide runs only to draft, on demand
                drafts = draft_only_step(self.guide, chosen, [records[i] for i in remaining])
            self._run_large(
                chosen, [records[i] for i in remaining], gen, scores, self.settings.prunes, drafts
            )
        return records

    def _run_guide(
        self,
        samples: list[Sample],
        records: list[SampleRecord],
        gen: GenerationSettings,
        drafting: bool = False,
    ) -> tuple[list[GuideScores], list[bool]]:
        return guide_step(self.guide, self.settings, samples, records, gen, drafting)

    def _run_large(
        self,
        samples,
        records,
        gen: GenerationSettings,
        scores,
        prune: bool,
        drafts: GuideDrafts | None = None,
    ) -> None:
        large_step(self.large, self.planner, samples, records, gen, scores, prune, drafts)

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
            result, record = self._loglikelihood(sample, continuation, self.settings.prunes)
        except Exception as error:  # noqa: BLE001 -- fall back, counted in the statistics
            if not self.settings.prunes:
                raise
            reason = f"{type(error).__name__}: {error}"
            logger.warning(f"{sample.task}/{sample.doc_id}: SGL log-likelihood failed ({reason}); unpruned")
            result, record = self._loglikelihood(sample, continuation, prune=False)
            record.fallback = reason
        self._price_reference_scoring(sample, continuation, record)
        return result, record

    def _price_reference_scoring(self, sample: Sample, continuation: str, record: SampleRecord) -> None:
        """``flops_reference`` of a log-likelihood request: the unpruned large model scoring the
        same continuation after the prompt built at the reference layout."""
        if self.reference is None:
            record.flops_reference = record.flops_large_alone
            return
        try:
            tokens = len(self.large.tokenizer(continuation, add_special_tokens=False).input_ids)
            record.flops_reference = accounting.large_prefill_flops(self.reference, sample, tokens)
        except Exception as error:  # noqa: BLE001 -- pricing must never lose a score
            reason = f"{type(error).__name__}: {error}"
            record.extra["flops_reference_failed"] = reason
            logger.warning(f"{sample.task}/{sample.doc_id}: no flops_reference ({reason})")

    def _loglikelihood(self, sample: Sample, continuation: str, prune: bool):
        scorer = self.guide if self.planner.method.answers_with_guide else self.large
        return score_continuation(
            scorer,
            self.large,
            self.settings,
            self.planner,
            sample,
            continuation,
            prune,
            self._guide_prompt_importance,
        )

    def _guide_prompt_importance(self, sample: Sample) -> tuple[GuideScores, float]:
        return guide_prompt_importance(self.guide, sample)
