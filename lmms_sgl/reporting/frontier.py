"""The accuracy / cost frontier: the points no cheaper point beats.

A point is on the frontier when no other point costs as little or less and scores higher; among
points of equal cost only the best scoring one is. Higher scores are better (negate a metric where
lower is better).
"""

from __future__ import annotations

from collections.abc import Sequence


def on_frontier(costs: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """For each ``(cost, score)`` point, whether it is on the frontier."""
    if len(costs) != len(scores):
        raise ValueError(f"{len(costs)} costs but {len(scores)} scores")
    marked = [False] * len(costs)
    best = float("-inf")
    for index in sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i])):
        if scores[index] > best:
            marked[index] = True
            best = scores[index]
    return marked
