"""Lossless speculative decoding: the guide drafts, the large model verifies.

After its prefill, the large model checks up to ``k`` drafted tokens per forward: it is fed its last
accepted token followed by the drafts ``d_1..d_k`` and reads its own greedy choice ``g_0..g_k`` at
every position. It accepts the longest prefix with ``d_i = g_{i-1}``, then adds its own ``g_a``
(at the first mismatch, or after the last draft), so every forward yields ``a + 1`` tokens and the
answer is exactly the large model's greedy answer. Rejected drafts leave its KV cache.

Drafts come from the guide: first its own answer when it has one (SGL's guide step, free), and once
that is used up or contradicted, the guide continues greedily from the large model's accepted text,
its own KV cache cut back to the prefix it shares with that text. It drafts only the tokens a round
asks for.

How many drafts a round asks for is each row's :class:`DraftSchedule` (the policy):

* the draft length starts at ``min(START_DRAFT, most)`` (``most`` = ``draft_tokens``), grows by 2
  after a round whose drafts were all accepted and shrinks by 1 (not below 1) after a rejection, never
  above ``most``;
* a round that accepts none of its drafts is a *miss*: it cost guide forwards and a wider
  verification for the one token plain decoding would have given. After ``MISSES_TO_PAUSE``
  consecutive misses drafting *pauses*: the large model decodes plain one-token steps (a forward with
  no drafts, no guide work) for ``PAUSE_STEPS`` tokens, then retries one round of a single draft. A
  retry that misses pauses again for twice as long (at most ``LONGEST_PAUSE`` tokens); one that
  accepts resumes drafting from length 1 and resets the pause length.

The policy only chooses what is verified, never what is accepted, so answers stay exactly the large
model's greedy answers whatever it decides.

Batches decode in lockstep: each forward carries one chunk per row, right-padded to the longest;
padding and rejected entries stay in the cache but are masked out in the model-level 2-D
``attention_mask`` (each row has its own holes), and position ids are given explicitly (the
prompt's last position plus the row's answer tokens so far, multimodal RoPE's rows included). The
cache's trailing columns that no row keeps are cut off, so a lone sample's cache after a rejection
is exactly the cache of a run that never saw the rejected tokens. Layer-K pruning composes: the
pruner masks its shorter caches with the same 2-D mask (``lmms_sgl.method.pruning``).

Everything here is plain model forwards over a ``DynamicCache``; no lmms-eval, no families.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


@dataclass
class DecodeState:
    """One model's incremental decoding of a batch.

    ``mask`` [B, C] covers every cache column (prompt then answer entries): 1 = the row sees it,
    0 = left padding, chunk padding or a dropped entry. ``last_position`` [..., B] is the position
    id of each row's last prompt token; answer token ``t`` (0-based) sits at ``last_position + 1 + t``.
    ``fed[b]`` answer tokens of row ``b`` are in the cache. ``forwards[b]`` lists ``(new tokens,
    answer tokens already cached)`` for each forward row ``b`` took part in (the FLOPs record).
    """

    cache: object
    mask: torch.Tensor
    last_position: torch.Tensor
    prompt_length: int
    fed: list[int]
    forwards: list[list[tuple[int, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.forwards:
            self.forwards = [[] for _ in self.fed]
        for index, layer in enumerate(self.cache.layers):
            if isinstance(layer, DynamicSlidingWindowLayer) or not isinstance(layer, DynamicLayer):
                raise TypeError(
                    f"speculative decoding needs a full dynamic KV cache; layer {index} is "
                    f"{type(layer).__name__}"
                )

    @classmethod
    def after_prefill(
        cls, cache, attention_mask: torch.Tensor, positions: torch.Tensor | None, cached_answer: int = 0
    ) -> DecodeState:
        """The state after a prefill over a left-padded batch (``attention_mask`` [B, P]) whose
        cache may also hold ``cached_answer`` generated tokens per row (all rows marked valid;
        :meth:`keep` drops the ones a row did not generate)."""
        batch, prompt = attention_mask.shape
        if positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat(
            [
                attention_mask.long(),
                torch.ones(batch, cached_answer, dtype=torch.long, device=attention_mask.device),
            ],
            dim=1,
        )
        return cls(cache, mask, positions[..., -1].clone(), prompt, [cached_answer] * batch)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def prompt_tokens(self, row: int) -> int:
        return int(self.mask[row, : self.prompt_length].sum())

    def forward(self, model: nn.Module, chunks: Sequence[Sequence[int]], pad_id: int) -> list[torch.Tensor]:
        """Feed ``chunks[b]`` (possibly empty) after row ``b``'s cached answer tokens, all rows in one
        forward; returns each row's fp32 logits ``[len(chunk), vocab]``. The new entries count as
        kept until :meth:`keep` says otherwise."""
        width = max(len(chunk) for chunk in chunks)
        if width == 0:
            raise ValueError("forward needs at least one new token in some row")
        device = self.mask.device
        ids = torch.full((self.batch, width), pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(self.batch, width, dtype=torch.long, device=device)
        for b, chunk in enumerate(chunks):
            if chunk:
                ids[b, : len(chunk)] = torch.tensor(list(chunk), dtype=torch.long, device=device)
                valid[b, : len(chunk)] = 1
                self.forwards[b].append((len(chunk), self.fed[b]))
        offsets = torch.tensor(self.fed, device=device)[:, None] + torch.arange(1, width + 1, device=device)
        positions = self.last_position.to(device)[..., None] + offsets
        self.mask = torch.cat([self.mask, valid], dim=1)
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        for b, chunk in enumerate(chunks):
            self.fed[b] += len(chunk)
        logits = out.logits.float()
        return [logits[b, : len(chunk)] for b, chunk in enumerate(chunks)]

    def keep(self, row: int, answer_tokens: int) -> None:
        """Keep only the first ``answer_tokens`` answer entries of ``row`` (drop the rest: rejected
        drafts, chunk padding, tokens the row never had), then cut the columns no row keeps."""
        if answer_tokens > self.fed[row]:
            raise ValueError(
                f"row {row} has {self.fed[row]} answer tokens cached, cannot keep {answer_tokens}"
            )
        kept = self.mask[row, self.prompt_length :].nonzero().flatten()
        self.mask[row, self.prompt_length + kept[answer_tokens:]] = 0
        self.fed[row] = answer_tokens
        self._trim()

    def _trim(self) -> None:
        used = self.mask[:, self.prompt_length :].any(0).nonzero()
        length = self.prompt_length + (int(used[-1]) + 1 if len(used) else 0)
        surplus = self.mask.shape[1] - length
        if surplus > 0:
            self.mask = self.mask[:, :length]
            for layer in self.cache.layers:
                layer.crop(-surplus)

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows of the batch, in this order."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.last_position = self.last_position.index_select(-1, index.to(self.last_position.device))
        self.fed = [self.fed[r] for r in rows]
        self.forwards = [self.forwards[r] for r in rows]
        self._trim()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class GuideDrafter:
    """Drafts from the guide: its own answer while the accepted text follows it, else greedy
    continuation of the accepted text with its KV cache cut back to their common prefix.

    ``state`` is the guide's decoding state whose cache holds ``answers[b][: state.fed[b]]``;
    ``answers[b]`` is the guide's greedy answer (stop token included if it stopped).
    """

    def __init__(self, model: nn.Module, state: DecodeState, answers: list[list[int]], stop_ids, pad_id: int):
        self.model, self.state, self.pad_id = model, state, pad_id
        self.sequences = [list(a) for a in answers]  # what the guide believes follows each prompt
        self.stop_ids = set(stop_ids)
        for b, answer in enumerate(answers):
            state.keep(b, min(len(answer), state.fed[b]))

    def _ended(self, sequence: list[int]) -> bool:
        return bool(sequence) and sequence[-1] in self.stop_ids

    def propose(self, requests: dict[int, tuple[list[int], int]]) -> dict[int, list[int]]:
        """``{row: (accepted answer tokens, wanted)}`` -> ``{row: up to wanted draft tokens}``."""
        drafts: dict[int, list[int]] = {}
        pending: dict[int, list[int]] = {}  # rows the guide must run for: tokens to feed next
        for row, (accepted, wanted) in requests.items():
            sequence = self.sequences[row]
            follows = common_prefix(sequence, accepted) == len(accepted)
            if wanted <= 0:
                drafts[row] = []
            elif follows and (len(sequence) >= len(accepted) + wanted or self._ended(sequence)):
                drafts[row] = sequence[len(accepted) : len(accepted) + wanted]
            else:
                shared = min(common_prefix(sequence[: self.state.fed[row]], accepted), len(accepted) - 1)
                self.state.keep(row, shared)
                self.sequences[row] = list(accepted)
                pending[row] = list(accepted[shared:])
        while pending:
            chunks = [pending.get(b, []) for b in range(self.state.batch)]
            logits = self.state.forward(self.model, chunks, self.pad_id)
            for row in list(pending):
                token = int(logits[row][-1].argmax())
                sequence = self.sequences[row]
                sequence.append(token)
                accepted, wanted = requests[row]
                drafted = len(sequence) - len(accepted)
                if drafted >= wanted or token in self.stop_ids:
                    drafts[row] = sequence[len(accepted) :]
                    del pending[row]
                else:
                    pending[row] = [token]
        return drafts


START_DRAFT = 4  # a row's first draft length (capped by draft_tokens)
MISSES_TO_PAUSE = 2  # consecutive rounds that accept nothing before drafting pauses
PAUSE_STEPS = 8  # plain decode steps of a first pause
LONGEST_PAUSE = 64  # pauses double after a failed retry, up to this many steps


@dataclass
class DraftSchedule:
    """One row's drafting policy (module docstring) and what it did.

    ``length``: drafts the next round asks for; ``pause_left``: plain steps left in the current pause
    (``0``: not paused); ``retrying``: the next round is the one-draft retry after a pause. Counted:
    ``rounds`` (verifications with at least one draft), ``drafted``, ``accepted``, ``forwards`` (large
    forwards after the prefill), ``pauses`` (times drafting paused), ``paused_steps`` (plain steps
    taken while paused), ``longest`` (most drafts in one round).
    """

    most: int
    length: int = 0
    misses: int = 0
    pause_left: int = 0
    pause_length: int = PAUSE_STEPS
    retrying: bool = False
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0
    pauses: int = 0
    paused_steps: int = 0
    longest: int = 0

    def __post_init__(self) -> None:
        if self.most < 1:
            raise ValueError(f"draft_tokens={self.most} must be >= 1")
        if not self.length:
            self.length = min(START_DRAFT, self.most)

    @property
    def wanted(self) -> int:
        """Drafts the next forward should verify (0: a plain decode step)."""
        if self.pause_left:
            return 0
        return 1 if self.retrying else self.length

    def update(self, drafted: int, accepted: int) -> None:
        """After a large forward that verified ``drafted`` drafts and accepted ``accepted``."""
        self.forwards += 1
        if drafted == 0:  # a plain step: paused, or no room left in the answer
            if self.pause_left:
                self.pause_left -= 1
                self.paused_steps += 1
                self.retrying = self.pause_left == 0
            return
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.longest = max(self.longest, drafted)
        if accepted == drafted:
            self.length = min(self.length + 2, self.most)
        else:
            self.length = max(self.length - 1, 1)
        self.misses = self.misses + 1 if accepted == 0 else 0
        if self.retrying:
            self.retrying = False
            if accepted == 0:
                self.pause_length = min(2 * self.pause_length, LONGEST_PAUSE)
                self._pause()
            else:
                self.pause_length = PAUSE_STEPS
        elif self.misses >= MISSES_TO_PAUSE:
            self._pause()

    def _pause(self) -> None:
        self.pauses += 1
        self.pause_left = self.pause_length
        self.length = 1  # a retry that succeeds resumes from here
        self.misses = 0


def speculative_decode(
    model: nn.Module,
    state: DecodeState,
    first_tokens: Sequence[int],
    drafter: GuideDrafter,
    *,
    max_new_tokens: int,
    draft_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    stop_text: Callable[[list[int]], int | None] | None = None,
) -> tuple[list[list[int]], list[DraftSchedule]]:
    """Greedy answers of ``model`` for a batch whose prompts are in ``state``'s cache and whose first
    answer tokens (from the prefill) are ``first_tokens``; per row and forward ``drafter`` proposes
    the drafts its :class:`DraftSchedule` asks for (at most ``draft_tokens``; none while paused). A
    row stops at a stop token, at ``max_new_tokens``, or where ``stop_text(tokens)`` (a stop string)
    returns the answer's length. Returns each row's answer tokens and its schedule."""
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens={draft_tokens} must be >= 1")
    stops = set(stop_ids)
    answers = [[int(t)] for t in first_tokens]
    schedules = [DraftSchedule(draft_tokens) for _ in answers]
    done = [False] * len(answers)

    def finish(row: int) -> None:
        answer = answers[row]
        for i, token in enumerate(answer):
            if token in stops:
                del answer[i + 1 :]
                done[row] = True
                break
        if len(answer) >= max_new_tokens:
            del answer[max_new_tokens:]
            done[row] = True
        if stop_text is not None:
            end = stop_text(answer)
            if end is not None:
                del answer[end:]
                done[row] = True

    for row in range(len(answers)):
        finish(row)
    while not all(done):
        live = [b for b in range(len(answers)) if not done[b]]
        wanted = {b: min(schedules[b].wanted, max_new_tokens - len(answers[b]) - 1) for b in live}
        drafts = drafter.propose({b: (answers[b], wanted[b]) for b in live})
        chunks = [[answers[b][-1], *drafts[b]] if b in drafts else [] for b in range(len(answers))]
        logits = state.forward(model, chunks, pad_id)
        for b in live:
            choices = logits[b].argmax(-1).tolist()
            draft = drafts[b]
            accepted = common_prefix(draft, choices)
            schedules[b].update(len(draft), accepted)
            answers[b] += [*draft[:accepted], choices[accepted]]
            state.keep(b, len(answers[b]) - 1)  # the cache holds every accepted token but the newest
            finish(b)
    return answers, schedules
