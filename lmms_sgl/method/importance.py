"""SGP importance: attention the guide's queries pay to each visual token, summed, without N x N maps.

The paper's score for visual token v (sgl-method.md section 1.2) is

    A[v] = sum_layers sum_heads ( sum_{prompt rows r >= last visual} attn[r, v]
                                 + sum_{generated tokens fed back} attn[t, v] )

with attn the post-softmax probabilities over *all* keys (causal mask applied, no renormalisation
over the visual subset). Like the official code, the prompt rows start at the last visual token
(inclusive) and the decode rows are the generated tokens as they are fed back, so the final
generated token (usually EOS) never contributes.

How it is recorded: the text model runs with the attention implementation ``ATTENTION_NAME``,
registered in transformers' ``AttentionInterface``. It returns the ordinary SDPA output, and while a
:class:`AttentionRecorder` is active it also computes softmax probabilities for the selected query
rows only (cost heads x rows x N per layer, fp32) and adds their visual-key columns into an fp32
buffer. Nothing of size N x N is ever kept, and ``output_attentions`` is never used.

Batches are supported: each decode step is kept as a separate ``[B, P]`` row, so that after
generation every sample counts exactly the steps that fed one of *its* tokens (samples that
finish early keep receiving padding in a batch; those steps are dropped in :meth:`finalize`).

Precision (``importance_precision``): ``fp32`` (default) accumulates fp32 probabilities in fp32.
``model`` reproduces the official code's arithmetic for users who need its exact rankings on
bf16/fp16: the text model runs eager attention (``EAGER_ATTENTION_NAME``), whose probabilities are
cast to the model dtype, and the sums keep the official code's two-level order, all in that dtype:
within each forward (the prefill, then each decode step) the layers' slices over the visual span
are added to a total that starts at 0, and those per-forward totals are then added up across the
forwards, prefill first. Rounding makes the order matter: one running total over every layer of
every step differs by a few units in the last place. On bf16 the two precisions differ at the top-k
boundary on a sizeable share of samples (near-ties rounded away).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

ATTENTION_NAME = "sgl_sdpa_record"
EAGER_ATTENTION_NAME = "sgl_eager_record"
PRECISIONS = ("fp32", "model")

_ACTIVE: contextvars.ContextVar[AttentionRecorder | None] = contextvars.ContextVar(
    "sgl_recorder", default=None
)


def recording_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA attention that also feeds the active :class:`AttentionRecorder`, if any."""
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.observe(module.layer_idx, query, key, attention_mask, scaling)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def recording_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' eager attention; its model-dtype probabilities feed the active recorder."""
    if scaling is None:
        scaling = module.head_dim**-0.5
    output, weights = eager_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.observe_weights(module.layer_idx, weights)
    return output, weights


def register_attention() -> str:
    """Register both recording attentions (with SDPA's / eager's mask format); idempotent."""
    AttentionInterface.register(ATTENTION_NAME, recording_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    AttentionInterface.register(EAGER_ATTENTION_NAME, recording_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EAGER_ATTENTION_NAME, eager_mask)
    return ATTENTION_NAME


def recording_attention(precision: str) -> str:
    """The guide's attention implementation for an ``importance_precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"importance_precision={precision!r} is not one of {PRECISIONS}")
    return ATTENTION_NAME if precision == "fp32" else EAGER_ATTENTION_NAME


register_attention()


@contextmanager
def observing(observer) -> Iterator:
    """Feed the recording attentions to ``observer`` (anything with ``observe`` and
    ``observe_weights``, as :class:`AttentionRecorder`) while the block runs."""
    token = _ACTIVE.set(observer)
    try:
        yield observer
    finally:
        _ACTIVE.reset(token)


def allowed_keys(
    attention_mask: torch.Tensor | None, rows: slice, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Which keys the query ``rows`` may see, as a bool tensor broadcastable to ``[B, H, rows, kv]``
    (or an additive float mask, passed through); ``None`` when every key is visible.

    A ``None`` attention mask means causal without padding (SDPA's ``is_causal``): query i of a block
    of ``q_len`` queries ending at key ``kv_len - 1`` sees keys ``<= kv_len - q_len + i``; a single
    query (a decode step) sees every key.
    """
    if attention_mask is None:
        if q_len == 1:
            return None
        query_pos = torch.arange(q_len, device=device)[rows] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= query_pos[:, None])[None, None]
    return attention_mask[:, :, rows, :kv_len]


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, rows: slice, scaling: float
) -> torch.Tensor:
    """Softmax probabilities ``[B, H, rows, kv]`` in fp32 for the selected query rows over all keys.

    As eager attention does: scores in the model's dtype, softmax in fp32. Grouped-query attention is
    handled by grouping query heads over their shared key head (what ``repeat_kv`` does) without
    materialising the repeated keys. Kept to a handful of ops: it runs in every layer at every step.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    q = (query[:, :, rows] * scaling).reshape(batch, kv_heads, heads // kv_heads, -1, head_dim)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).reshape(batch, heads, -1, kv_len).float()
    allowed = allowed_keys(attention_mask, rows, query.shape[2], kv_len, query.device)
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    if allowed.dtype == torch.bool:
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        scores = scores + allowed.float()
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked (padding) rows -> 0


@dataclass
class AttentionRecorder:
    """Accumulates attention mass on prompt keys for one batched ``generate`` (or forward) call.

    Args:
        prompt_rows: ``[B, P]`` bool, the prefill query rows that count (per sample).
        layers: decoder layers to record (``None`` = all).
        record_decode: also record the single query row of each decode step.
        visual_mask: ``[B, P]`` bool; needed by the model-dtype path (eager attention), which sums
            each sample's visual span ``first..last`` as the official code slices it.
    """

    prompt_rows: torch.Tensor
    layers: frozenset[int] | None = None
    record_decode: bool = True
    visual_mask: torch.Tensor | None = None
    prefill: torch.Tensor = field(init=False)
    decode_steps: list[torch.Tensor] = field(init=False, default_factory=list)
    _prefill_layers: set[int] = field(init=False, default_factory=set)
    _decode_calls: dict[int, int] = field(init=False, default_factory=dict)
    _forwards: list[torch.Tensor] = field(init=False, default_factory=list)  # model dtype, per step

    def __post_init__(self) -> None:
        self.prompt_rows = self.prompt_rows.bool()
        self.prefill = torch.zeros(
            self.prompt_rows.shape, dtype=torch.float32, device=self.prompt_rows.device
        )

    @property
    def prompt_length(self) -> int:
        return self.prompt_rows.shape[1]

    @contextmanager
    def active(self) -> Iterator[AttentionRecorder]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def _step(self, layer_idx: int, q_len: int) -> int | None:
        """0 for this layer's prefill call, s >= 1 for its s-th decode step, ``None`` to skip."""
        if self.layers is not None and layer_idx not in self.layers:
            return None
        if layer_idx not in self._prefill_layers:
            if q_len != self.prompt_length:
                raise RuntimeError(
                    f"importance recording expects a prefill of {self.prompt_length} tokens first; "
                    f"layer {layer_idx} got {q_len} queries"
                )
            self._prefill_layers.add(layer_idx)
            return 0
        if q_len != 1:
            raise RuntimeError(f"importance recording expects single-token decode steps, got {q_len} queries")
        if not self.record_decode:
            return None
        step = self._decode_calls.get(layer_idx, 0) + 1
        self._decode_calls[layer_idx] = step
        return step

    def observe_weights(self, layer_idx: int, weights: torch.Tensor) -> None:
        """Model-dtype path: ``weights`` ``[B, H, q, kv]`` are eager attention's probabilities."""
        step = self._step(layer_idx, weights.shape[2])
        if step is None:
            return
        if self.visual_mask is None:
            raise RuntimeError("importance_precision='model' needs the recorder's visual_mask")
        while len(self._forwards) <= step:  # a new forward: its own total, from 0
            self._forwards.append(
                torch.zeros(self.prompt_rows.shape, dtype=weights.dtype, device=self.prefill.device)
            )
        forward = self._forwards[step]
        positions = torch.arange(self.prompt_length)
        for b in range(weights.shape[0]):
            visual = positions[self.visual_mask[b].cpu()]
            rows = self.prompt_rows[b].nonzero()
            if len(visual) == 0 or (step == 0 and len(rows) == 0):
                continue
            first, last = int(visual[0]), int(visual[-1]) + 1
            from_row = int(rows[0]) if step == 0 else 0  # prefill: rows from the last visual token
            queries = weights[b : b + 1, :, from_row:, first:last]
            forward[b, first:last] += queries.sum(dim=(0, 1, 2)).to(forward.device)

    def observe(self, layer_idx: int, query, key, attention_mask, scaling) -> None:
        step = self._step(layer_idx, query.shape[2])
        if step is None:
            return
        prompt = self.prompt_length
        if step == 0:
            row_weights = self.prompt_rows.to(query.device)
            counted = row_weights.any(0).nonzero()
            if counted.numel() == 0:
                return
            rows = slice(int(counted[0]), prompt)
            probs = attention_probabilities(query, key, attention_mask, rows, scaling)
            mass = torch.einsum("bhqk,bq->bk", probs[..., :prompt], row_weights[:, rows].float())
            self.prefill += mass.to(self.prefill.device)
            return
        if step > len(self.decode_steps):
            self.decode_steps.append(
                torch.zeros(self.prefill.shape, dtype=torch.float32, device=query.device)
            )
        probs = attention_probabilities(query, key, attention_mask, slice(0, 1), scaling)
        buffer = self.decode_steps[step - 1]  # layers may sit on several devices (device_map=auto)
        buffer += probs[..., :prompt].sum(dim=(1, 2)).to(buffer.device)

    def finalize(self, fed_tokens: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Attention mass per prompt key, ``[B, P]`` fp32.

        ``fed_tokens[b]`` is how many decode steps belong to sample b: its generated tokens that were
        fed back, i.e. its answer length (EOS included) minus one. ``None`` counts every step.
        The model-dtype path returns, in the model dtype, the per-forward totals added up forward by
        forward (prefill first), as the official code accumulates them.
        """
        if self._forwards:
            totals = [self._forwards[0].clone()]  # totals[s]: after the prefill and s decode steps
            for forward in self._forwards[1:]:
                totals.append(totals[-1] + forward)
            if fed_tokens is None:
                return totals[-1]
            fed = torch.as_tensor(fed_tokens).clamp(0, len(totals) - 1).tolist()
            return torch.stack([totals[s][b] for b, s in enumerate(fed)])
        total = self.prefill.clone()
        if not self.decode_steps:
            return total
        steps = torch.stack(self.decode_steps).to(total.device)  # [S, B, P]
        if fed_tokens is None:
            return total + steps.sum(0)
        fed = torch.as_tensor(fed_tokens, device=steps.device).clamp(min=0)
        use = torch.arange(steps.shape[0], device=steps.device)[:, None] < fed[None, :]  # [S, B]
        return total + (steps * use[..., None]).sum(0)


def prompt_rows_from_last_visual(visual_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rows from each sample's last visual token (inclusive, as the official code) to the prompt end.

    Samples without visual tokens get no rows (their importance is empty anyway).
    """
    positions = torch.arange(visual_mask.shape[1], device=visual_mask.device)
    last_visual = torch.where(visual_mask, positions, -1).max(dim=1).values  # [B]
    rows = positions[None, :] >= last_visual[:, None]
    return rows & (last_visual[:, None] >= 0) & attention_mask.bool()


def last_prompt_row(attention_mask: torch.Tensor) -> torch.Tensor:
    """Only the final prompt row of each sample (FastV's query); left padding keeps it last."""
    rows = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    rows[:, -1] = True
    return rows


def visual_scores(mass: torch.Tensor, visual_mask: torch.Tensor) -> list[torch.Tensor]:
    """Split ``[B, P]`` attention mass into one vector per sample over its visual tokens, in order."""
    return [mass[b][visual_mask[b]] for b in range(mass.shape[0])]
