"""SEE: small-VLM early exiting (sgl-method.md section 2).

* Confidence: the length-normalised probability of the guide's answer, computed in log space,
  ``S_conf = exp(mean_i log p_i)`` over its generated tokens (EOS included), with p_i the
  probability of the chosen token under the processed generation scores (softmax max = the greedy
  token's probability).
* Consistency: the *raw product* of the guide's probabilities for its own answer in one
  teacher-forced pass that keeps only the top ``consistency_ratio`` of visual tokens,
  ``S_cons = exp(sum_i log p'_i)``. Like the paper's formula it is not length-normalised, so long
  answers lean towards calling the large model.
* Decision: ``S = (S_conf + S_cons) / 2``; exit (return the guide's answer) when ``S >= threshold``.

Text-only samples: there is nothing to drop, so the consistency pass is the guide's own
teacher-forced pass over the full input and S_cons is the raw product of those probabilities; the
exit rule is unchanged. (The official code cannot run text-only samples at all.)
"""

from __future__ import annotations

import torch


def confidence(step_logprobs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``exp(mean log p)`` per sample from ``[steps, B]`` log-probabilities and answer lengths ``[B]``."""
    steps = step_logprobs.shape[0]
    lengths = lengths.to(step_logprobs.device)
    use = torch.arange(steps, device=step_logprobs.device)[:, None] < lengths[None, :]
    total = (step_logprobs.double() * use).sum(0)
    return torch.exp(total / lengths.clamp(min=1)).where(lengths > 0, torch.zeros_like(total)).float()


def consistency(token_logprobs: list[torch.Tensor]) -> torch.Tensor:
    """``exp(sum log p')`` per sample (a raw product, as in the paper and the official code)."""
    return torch.stack([torch.exp(lp.double().sum()) for lp in token_logprobs]).float()


def exit_score(conf: torch.Tensor, cons: torch.Tensor) -> torch.Tensor:
    return (conf + cons) / 2


def should_exit(score: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Exit where ``score >= threshold``; ``None`` disables early exit."""
    if threshold is None:
        return torch.zeros_like(score, dtype=torch.bool)
    return score >= threshold
