"""Summary statistics for benchmark samples: pure functions over lists of numbers.

Percentiles use linear interpolation between closest ranks, the same method as numpy's default
(`numpy.percentile(..., method="linear")`): the p-th percentile of n sorted values sits at rank
p/100 * (n - 1), interpolated between the two neighbouring values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

PERCENTILE_METHOD = "linear interpolation between closest ranks (numpy default)"
REPORTED_PERCENTILES = (50.0, 95.0, 99.0)


def _sorted_finite(values: Iterable[float]) -> list[float]:
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("no values to summarise")
    if any(math.isnan(v) for v in ordered):
        raise ValueError("values contain NaN")
    return ordered


def percentile(values: Iterable[float], percent: float) -> float:
    """The `percent`-th percentile (0-100) of `values` by linear interpolation."""
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be within 0..100, got {percent}")
    ordered = _sorted_finite(values)
    rank = percent / 100.0 * (len(ordered) - 1)
    lower = math.floor(rank)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)


def median(values: Iterable[float]) -> float:
    """The middle value; the mean of the two middle values for an even count."""
    return percentile(values, 50.0)


def percentiles(
    values: Iterable[float], percents: Sequence[float] = REPORTED_PERCENTILES
) -> dict[str, float]:
    """Named percentiles, e.g. {"p50": ..., "p95": ..., "p99": ...}."""
    ordered = _sorted_finite(values)
    return {f"p{p:g}": percentile(ordered, p) for p in percents}


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is zero (nothing to compare)."""
    return None if denominator == 0 else numerator / denominator
