"""Means and paired differences over questions, with their standard errors.

Two methods evaluated on the same questions differ by less noise than their two standard errors
suggest: the paired difference's error is ``sd(a - b) / sqrt(n)`` over the questions both answered.
"""

from __future__ import annotations

import math


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error."""
    n = len(values)
    if not n:
        raise ValueError("no values: a mean needs at least one (no samples in common?)")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_gap(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean of ``a[k] - b[k]`` over the keys (samples) both hold, its standard error
    (``sd(d) / sqrt(n)``) and ``n``."""
    common = sorted(set(a) & set(b))
    mean, err = mean_stderr([a[k] - b[k] for k in common])
    return mean, err, len(common)
