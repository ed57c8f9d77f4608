"""The guide's part of SGL: answer greedily while recording importance, then the consistency pass.

``run_guide`` does one batched greedy ``generate`` of the small VLM with

* an :class:`AttentionRecorder` active (importance A, sgl-method.md section 1.2),
* a logits processor that keeps the log-probability of each step's greedy token (confidence),
* a pre-hook on the text model that keeps the merged prompt embeddings (image features already
  inserted), so the consistency pass does not run the vision tower again (as the official code).

``consistency_pass`` then runs one teacher-forced forward over prompt + answer with only the top
``ratio`` of visual tokens, dropped before layer 0 with original positions kept (K = 0 pruning):
the prefill's own position ids (multimodal RoPE's 3-D ones included) and visual features
(Qwen3-VL's deepstack) are captured and reused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from lmms_sgl.method.early_exit import confidence, consistency
from lmms_sgl.method.importance import AttentionRecorder, prompt_rows_from_last_visual, visual_scores
from lmms_sgl.method.pruning import VisualTokenPruner
from lmms_sgl.method.selection import plan_from_scores


class StepLogProbs(LogitsProcessor):
    """Records ``max log softmax(scores)`` per step: the greedy token's log-probability ``[B]``.

    Added last, so it sees the scores after every other processor (``min_new_tokens`` etc.), the
    same processed scores the official code reads from ``output_scores``.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values)
        return scores


# What a text model takes besides embeddings and positions to add visual features (Qwen3-VL's deepstack).
VISUAL_TEXT_KWARGS = ("visual_pos_masks", "deepstack_visual_embeds")


@contextmanager
def captured_prompt_embeddings(text_model: nn.Module) -> Iterator[dict]:
    """Keep the ``inputs_embeds`` of the first call of ``text_model`` (the prefill), its position ids
    (``[B, P]``, or multimodal ``[3 or 4, B, P]``) and its visual kwargs (``VISUAL_TEXT_KWARGS``)."""
    store: dict = {}

    def grab(module, args, kwargs):
        if "embeds" not in store and kwargs.get("inputs_embeds") is not None:
            store["embeds"] = kwargs["inputs_embeds"].detach()
            store["positions"] = kwargs.get("position_ids")
            store["visual_kwargs"] = {k: kwargs[k] for k in VISUAL_TEXT_KWARGS if kwargs.get(k) is not None}

    handle = text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def answer_lengths(
    generated: torch.Tensor, stop_token_ids: Sequence[int], tokenizer=None, stop_strings: Sequence[str] = ()
) -> torch.Tensor:
    """Tokens each sample really generated: up to and including its first stop token, or up to the
    token that completes a stop string; later positions are batch padding."""
    stop_ids = set(stop_token_ids)
    lengths = []
    for row in generated.tolist():
        length = len(row)
        for i, token in enumerate(row):
            if token in stop_ids:
                length = i + 1
                break
        if stop_strings and tokenizer is not None:
            length = _shortest_prefix_with_stop(row[:length], tokenizer, stop_strings) or length
        lengths.append(length)
    return torch.tensor(lengths, dtype=torch.long)


def _shortest_prefix_with_stop(tokens: list[int], tokenizer, stop_strings: Sequence[str]) -> int | None:
    """Fewest leading tokens whose text contains a stop string (binary search: once a prefix
    contains one, every longer prefix does), or ``None``."""

    def stops(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return any(s and s in text for s in stop_strings)

    if not tokens or not stops(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if stops(middle):
            high = middle
        else:
            low = middle + 1
    return low


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` numbers them under left padding (cumsum - 1, padding at 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@dataclass
class GuideRun:
    generated: torch.Tensor  # [B, S] new token ids (batch padding after each answer)
    lengths: torch.Tensor  # [B] answer lengths in tokens, stop token included
    importance: list[torch.Tensor]  # per sample, one fp32 score per visual token in order
    confidence: torch.Tensor  # [B]
    prompt_embeds: torch.Tensor  # [B, P, d]
    visual_mask: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P]
    prompt_positions: torch.Tensor | None = None  # position ids of the prefill, [..., B, P]
    visual_kwargs: dict | None = None  # the prefill's VISUAL_TEXT_KWARGS
    cache: object | None = None  # generate's KV cache: prompt + answer but its last token (drafting)


def run_guide(
    model: nn.Module,
    text_model: nn.Module,
    inputs: dict,
    visual_mask: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    tokenizer=None,
    stop_strings: Sequence[str] = (),
) -> GuideRun:
    """Greedy answer + importance + confidence for a left-padded batch.

    ``model`` is the guide VLM whose text model runs a recording attention
    (``lmms_sgl.method.importance.recording_attention(precision)``).
    """
    attention_mask = inputs["attention_mask"]
    recorder = AttentionRecorder(
        prompt_rows_from_last_visual(visual_mask, attention_mask), visual_mask=visual_mask
    )
    step_logprobs = StepLogProbs()
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings and tokenizer else {}
    with recorder.active(), captured_prompt_embeddings(text_model) as captured, torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            logits_processor=LogitsProcessorList([step_logprobs]),
            return_dict_in_generate=True,
            **extra,
        )
    sequences = out.sequences
    prompt_length = attention_mask.shape[1]
    generated = sequences[:, prompt_length:]
    lengths = answer_lengths(generated, stop_token_ids, tokenizer, stop_strings)
    mass = recorder.finalize(lengths - 1)  # the last answer token is never fed back
    return GuideRun(
        generated=generated,
        lengths=lengths,
        importance=visual_scores(mass, visual_mask.to(mass.device)),
        confidence=confidence(torch.stack(step_logprobs.steps), lengths),
        prompt_embeds=captured["embeds"],
        visual_mask=visual_mask,
        attention_mask=attention_mask,
        prompt_positions=captured["positions"],
        visual_kwargs=captured["visual_kwargs"],
        cache=out.past_key_values,
    )


@contextmanager
def passed_to(text_model: nn.Module, kwargs: dict) -> Iterator[None]:
    """Give ``text_model`` these keyword arguments on every call (the VLM's forward, run on
    embeddings without pixels, would pass none: Qwen3-VL's deepstack features)."""
    if not kwargs:
        yield
        return

    def add(module, args, call_kwargs):
        return args, {**call_kwargs, **kwargs}

    handle = text_model.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def answer_positions(run: GuideRun, mask: torch.Tensor) -> torch.Tensor:
    """Position ids of prompt + answer: the prefill's own (multimodal RoPE's 3-D positions
    included) continued by one per answer token after the last prompt token, as ``generate``
    numbers decode steps (``rope_deltas`` included); ``cumsum - 1`` if the prefill had none."""
    if run.prompt_positions is None:
        return positions_from_mask(mask)
    prompt = run.prompt_positions.to(mask.device)
    steps = torch.arange(1, mask.shape[1] - prompt.shape[-1] + 1, device=mask.device)
    return torch.cat([prompt, prompt[..., -1:] + steps], dim=-1)


def consistency_pass(model: nn.Module, text_model: nn.Module, run: GuideRun, ratio: float) -> torch.Tensor:
    """S_cons per sample: one forward over prompt + answer keeping the top ``ratio`` visual tokens."""
    generated = run.generated
    answer_mask = torch.arange(generated.shape[1], device=generated.device)[None, :] < run.lengths[
        :, None
    ].to(generated.device)
    device = run.prompt_embeds.device
    embeds = torch.cat([run.prompt_embeds, text_model.get_input_embeddings()(generated.to(device))], dim=1)
    mask = torch.cat([run.attention_mask.to(device), answer_mask.to(device).long()], dim=1)
    visual = torch.cat([run.visual_mask.to(device), torch.zeros_like(answer_mask, device=device)], dim=1)
    plan = plan_from_scores(run.importance, visual, mask, ratio)
    visual_kwargs = dict(run.visual_kwargs or {})
    if "visual_pos_masks" in visual_kwargs:  # the answer has no visual positions
        prompt_visual = visual_kwargs["visual_pos_masks"]
        answer = torch.zeros(answer_mask.shape, dtype=prompt_visual.dtype, device=prompt_visual.device)
        visual_kwargs["visual_pos_masks"] = torch.cat([prompt_visual, answer], dim=1)
    pruner = VisualTokenPruner(text_model, 0)
    # the visual kwargs go in before the pruner's own text-model hook (hooks run in order) sees them
    with passed_to(text_model, visual_kwargs), pruner.installed(), torch.no_grad():
        pruner.arm(plan)
        positions = answer_positions(run, mask)
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    logits = out.logits
    slot_of = plan.slot_of()
    prompt_length = run.attention_mask.shape[1]
    token_logprobs = []
    for b in range(mask.shape[0]):
        n = int(run.lengths[b])
        predictors = slot_of[b, prompt_length - 1 : prompt_length - 1 + n]
        logprobs = torch.log_softmax(logits[b, predictors].float(), dim=-1)
        token_logprobs.append(logprobs.gather(1, generated[b, :n, None].to(device)).squeeze(1))
    return consistency(token_logprobs)
