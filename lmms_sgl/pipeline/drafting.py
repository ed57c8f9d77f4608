"""Pipeline glue of speculative decoding (``draft=guide``): the guide's drafts per sample, the large
model's drafted generation, and what the records say about it.

The guide's drafts come from its SGL run (its answer and KV cache, :func:`drafts_from_run`) or,
with ``method=large_only``, from the guide's prefill alone (:func:`draft_only_step`): nothing reads
a ``large_only`` guide's answer (no importance, no exit), so it writes no answer up front and drafts
only the tokens each verification round asks for (none while drafting is paused).
:func:`drafted_generate` runs the large model's prefill with ``generate`` (so its first token is
exactly ``generate``'s, ``min_new_tokens=1`` included) and then the speculative loop of
``lmms_sgl.method.drafting``, all under the caller's pruning context.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from loguru import logger
from torch import nn

from lmms_sgl.families.base import LoadedVLM
from lmms_sgl.method import cost
from lmms_sgl.method.drafting import DecodeState, DraftSchedule, GuideDrafter, speculative_decode
from lmms_sgl.method.guide import GuideRun, _shortest_prefix_with_stop
from lmms_sgl.pipeline import accounting
from lmms_sgl.pipeline.records import Sample, SampleRecord


@dataclass
class GuideDrafts:
    """The guide's greedy answers (or, drafting lazily, their first tokens) for a batch and the
    decoding state holding them, shared by the batch's samples; :meth:`rows` narrows it to the
    samples the large model answers."""

    guide: LoadedVLM
    state: DecodeState
    answers: list[list[int]]

    def rows(self, rows: list[int]) -> GuideDrafts:
        self.state.select(rows)
        self.answers = [self.answers[r] for r in rows]
        return self


def check_shared_tokenizer(large: LoadedVLM, guide: LoadedVLM) -> None:
    """Drafted token ids go to the large model as they are: both tokenizers must map every token to
    the same id. Raised at load time, naming what differs."""
    large_vocab, guide_vocab = large.tokenizer.get_vocab(), guide.tokenizer.get_vocab()
    differ = sorted(
        t for t in large_vocab.keys() | guide_vocab.keys() if large_vocab.get(t) != guide_vocab.get(t)
    )
    if differ:
        examples = ", ".join(
            f"{t!r}: large {large_vocab.get(t)} / guide {guide_vocab.get(t)}" for t in differ[:3]
        )
        raise ValueError(
            f"draft='guide' needs guide and large model to share token ids; {len(differ)} of "
            f"{len(large_vocab | guide_vocab)} tokens differ ({examples}); guide={guide.path!r}, "
            f"pretrained={large.path!r}. Use a guide with the large model's tokenizer, or drop draft."
        )


def not_applied_reason(do_sample: bool, num_beams: int) -> str | None:
    """Why speculative decoding cannot serve these generation settings (it is greedy only)."""
    if do_sample:
        return "do_sample (temperature > 0)"
    if num_beams > 1:
        return f"num_beams={num_beams}"
    return None


def pad_id(loaded: LoadedVLM) -> int:
    tokenizer = loaded.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else loaded.stop_token_ids[0]


def drafts_from_run(guide: LoadedVLM, run: GuideRun) -> GuideDrafts:
    """The guide's SGL run as drafts: its answers, and its generate cache (prompt + answer but the
    last token) as the state it continues drafting from."""
    prompt = run.attention_mask.shape[1]
    cached = run.cache.get_seq_length() - prompt
    state = DecodeState.after_prefill(run.cache, run.attention_mask, run.prompt_positions, cached)
    answers = [run.generated[b, : int(run.lengths[b])].tolist() for b in range(len(run.lengths))]
    return GuideDrafts(guide, state, answers)


@contextmanager
def captured_positions(text_model: nn.Module) -> Iterator[dict]:
    """The position ids the text model gets in its first call (the prefill), as ``generate`` made
    them (multimodal RoPE's rows included); decode positions continue from their last column."""
    store: dict = {}

    def grab(module, args, kwargs):
        if "positions" not in store:
            store["positions"] = kwargs.get("position_ids")

    handle = text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def greedy_prefill(loaded: LoadedVLM, inputs: dict, max_new_tokens: int) -> tuple[torch.Tensor, DecodeState]:
    """``generate``'s first greedy token per row and the decoding state after the prefill."""
    with captured_positions(loaded.text_model) as captured, torch.no_grad():
        out = loaded.model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=1,
            min_new_tokens=1,
            return_dict_in_generate=True,
        )
    first = out.sequences[:, inputs["input_ids"].shape[1]]
    state = DecodeState.after_prefill(
        out.past_key_values, inputs["attention_mask"], captured.get("positions")
    )
    return first, state


def draft_only_step(guide: LoadedVLM, samples: list[Sample], records: list[SampleRecord]) -> GuideDrafts:
    """``method=large_only`` with ``draft=guide``: the guide's prefill and first greedy token only (no
    importance, no consistency, no exit); it drafts the rest on demand during verification. Its
    vision tower and prefill FLOPs are counted in the records (its drafting forwards by
    :func:`record_drafting`)."""
    start = time.perf_counter()
    inputs = guide.family.build_batch(guide, [s.prompt for s in samples])
    first, state = greedy_prefill(guide, inputs, 1)
    seconds = (time.perf_counter() - start) / len(samples)
    _, real, vision = accounting.layout(guide, inputs, samples)
    for b, record in enumerate(records):
        flops = vision[b] + cost.prefill_flops(guide.text_shape, real[b])
        record.flops += flops
        record.extra["guide_flops"] = flops
        record.guide_seconds = seconds
    return GuideDrafts(guide, state, [[int(t)] for t in first.tolist()])


@dataclass
class DraftedRun:
    sequences: torch.Tensor  # [B, P + S]: prompt then answer, padded with the pad id
    stats: list[DraftSchedule]
    large: DecodeState
    guide: DecodeState


def drafted_generate(
    large: LoadedVLM, inputs: dict, drafts: GuideDrafts, max_new_tokens: int, draft_tokens: int, until
) -> DraftedRun:
    """The large model's greedy answers, verified from the guide's drafts (call it inside the
    pruning context if the large model prunes)."""
    first, state = greedy_prefill(large, inputs, max_new_tokens)
    guide = drafts.guide
    drafter = GuideDrafter(guide.model, drafts.state, drafts.answers, guide.stop_token_ids, pad_id(guide))
    tokenizer = large.tokenizer

    def stop_text(tokens: list[int]) -> int | None:
        return _shortest_prefix_with_stop(tokens, tokenizer, until) if until else None

    answers, stats = speculative_decode(
        large.model,
        state,
        first.tolist(),
        drafter,
        max_new_tokens=max_new_tokens,
        draft_tokens=draft_tokens,
        stop_ids=large.stop_token_ids,
        pad_id=pad_id(large),
        stop_text=stop_text if until else None,
    )
    width = max(len(a) for a in answers)
    generated = torch.full((len(answers), width), pad_id(large), dtype=torch.long)
    for b, answer in enumerate(answers):
        generated[b, : len(answer)] = torch.tensor(answer, dtype=torch.long)
    sequences = torch.cat([inputs["input_ids"].cpu(), generated], dim=1)
    return DraftedRun(sequences, stats, state, drafts.state)


def record_drafting(
    large: LoadedVLM,
    guide: LoadedVLM,
    run: DraftedRun,
    record: SampleRecord,
    row: int,
    vision: float,
    prompt: int,
    layer_k: int | None,
    pruned: int | None,
) -> float:
    """Fill ``record.extra["drafting"]`` for batch row ``row``, add the guide's drafting FLOPs to
    the record, and return the large model's FLOPs: its prefill and every verification forward,
    rejected drafts included (``pruned``: the row's prompt tokens in layers >= K)."""
    shape = large.text_shape
    prefill = cost.prefill_flops(shape, prompt, layer_k, None if layer_k is None else pruned)
    verify = sum(
        cost.chunk_flops(shape, new, prompt + past, layer_k, None if layer_k is None else pruned + past)
        for new, past in run.large.forwards[row]
    )
    guide_prompt = run.guide.prompt_tokens(row)
    drafting = sum(
        cost.chunk_flops(guide.text_shape, new, guide_prompt + past) for new, past in run.guide.forwards[row]
    )
    stats = run.stats[row]
    record.flops += drafting
    record.extra["drafting"] = {
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "large_forwards": 1 + stats.forwards,
        "guide_forwards": len(run.guide.forwards[row]),
        "guide_drafting_flops": drafting,
        # the adaptive policy (lmms_sgl.method.drafting.DraftSchedule)
        "rounds": stats.rounds,
        "longest_draft": stats.longest,
        "draft_length": stats.length,
        "pauses": stats.pauses,
        "paused_steps": stats.paused_steps,
    }
    return vision + prefill + verify


_warned: set[str] = set()


def note_not_applied(records: list[SampleRecord], reason: str) -> None:
    """Count samples whose generation settings exclude drafting; say so once per reason."""
    for record in records:
        record.extra["draft_not_applied"] = reason
    if reason not in _warned:
        _warned.add(reason)
        logger.warning(
            f"draft='guide' is greedy only: not applied to requests with {reason}; "
            "the large model decodes token by token there (counted as draft_not_applied)"
        )
