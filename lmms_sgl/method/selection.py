"""Which tokens survive: top-k visual tokens by importance, every text token, original order.

A :class:`KeepPlan` describes, for a left-padded batch of prompts of length P, the kept original
positions of each sample, re-packed to the left-padded length P' = max kept count:
``index[b, j]`` is an original position and ``valid[b, j]`` says whether slot j is real (True)
or padding. Kept positions are sorted, so kept tokens stay in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def keep_count(n_visual: int, keep_ratio: float) -> int:
    """``max(1, int(n_visual * keep_ratio))`` as the official code computes it: the floating-point
    product, floored (so 2,880 tokens at 0.35 keep 1,007: the product is 1007.9999...)."""
    if n_visual == 0:
        return 0
    return max(1, min(n_visual, int(n_visual * keep_ratio)))


@dataclass(frozen=True)
class KeepPlan:
    index: torch.Tensor  # [B, P'] long, original positions (0 where padding)
    valid: torch.Tensor  # [B, P'] bool
    prompt_length: int  # P, the length the plan applies to
    kept_visual: tuple[int, ...]  # per sample
    total_visual: tuple[int, ...]  # per sample

    @property
    def pruned_length(self) -> int:
        return self.index.shape[1]

    def slot_of(self) -> torch.Tensor:
        """``[B, P]``: where each original position sits in the pruned sequence (-1 if dropped), to
        read per-position outputs (logits) of a pruned forward back by original position."""
        slots = torch.full(
            (self.index.shape[0], self.prompt_length), -1, dtype=torch.long, device=self.index.device
        )
        for b in range(self.index.shape[0]):
            real = self.valid[b]
            slots[b, self.index[b][real]] = real.nonzero().flatten()
        return slots

    def repeat_rows(self, times: int) -> KeepPlan:
        """Each row repeated ``times`` times, as ``generate`` expands a batch for beam search."""
        return KeepPlan(
            self.index.repeat_interleave(times, dim=0),
            self.valid.repeat_interleave(times, dim=0),
            self.prompt_length,
            tuple(k for k in self.kept_visual for _ in range(times)),
            tuple(t for t in self.total_visual for _ in range(times)),
        )

    def to(self, device: torch.device) -> KeepPlan:
        return KeepPlan(
            self.index.to(device),
            self.valid.to(device),
            self.prompt_length,
            self.kept_visual,
            self.total_visual,
        )


def pack_positions(kept: list[torch.Tensor], prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad per-sample sorted position lists into ``(index, valid)`` of width max length."""
    width = max((len(k) for k in kept), default=0)
    device = kept[0].device if kept else torch.device("cpu")
    index = torch.zeros(len(kept), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(kept), width, dtype=torch.bool, device=device)
    for b, positions in enumerate(kept):
        if len(positions):
            index[b, width - len(positions) :] = positions
            valid[b, width - len(positions) :] = True
    return index, valid


def plan_from_scores(
    scores: list[torch.Tensor | None],
    visual_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    keep_ratio: float,
    counts: list[int] | None = None,
) -> KeepPlan:
    """Keep the top ``keep_count`` visual tokens of each sample by ``scores`` plus all real text tokens.

    Args:
        scores: per sample, one score per visual token of that sample in position order (``None``
            keeps every visual token of that sample).
        visual_mask: ``[B, P]`` bool, visual-token positions.
        attention_mask: ``[B, P]``, 1 for real tokens, 0 for padding (which is dropped).
        counts: per sample, how many visual tokens to keep instead of ``keep_count(n, keep_ratio)``
            (PDrop counts from the original image, not from the tokens left), at most all of them.
    """
    kept, kept_visual, total_visual = [], [], []
    for b in range(visual_mask.shape[0]):
        visual_positions = visual_mask[b].nonzero().flatten()
        text_positions = (attention_mask[b].bool() & ~visual_mask[b]).nonzero().flatten()
        n_visual = len(visual_positions)
        sample_scores = scores[b]
        if sample_scores is None:
            chosen = visual_positions
        else:
            if len(sample_scores) != n_visual:
                raise LayoutMismatchError(
                    f"sample {b}: {len(sample_scores)} importance scores for {n_visual} visual tokens"
                )
            k = keep_count(n_visual, keep_ratio) if counts is None else min(counts[b], n_visual)
            if k:
                chosen = visual_positions[
                    torch.topk(sample_scores.float().to(visual_positions.device), k).indices
                ]
            else:
                chosen = visual_positions[:0]
        kept.append(torch.sort(torch.cat([text_positions, chosen])).values)
        kept_visual.append(len(chosen))
        total_visual.append(n_visual)
    index, valid = pack_positions(kept, visual_mask.shape[1])
    return KeepPlan(index, valid, visual_mask.shape[1], tuple(kept_visual), tuple(total_visual))


def random_scores(
    visual_mask: torch.Tensor, seed: int, sample_keys: list[int] | None = None
) -> list[torch.Tensor]:
    """Seeded random importance (the ``random`` baseline); per-sample keys make it batch-invariant."""
    out = []
    for b in range(visual_mask.shape[0]):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + (sample_keys[b] if sample_keys else b))
        out.append(torch.rand(int(visual_mask[b].sum()), generator=generator))
    return out


class LayoutMismatchError(ValueError):
    """The guide and the large model see different numbers of visual tokens for a sample."""
