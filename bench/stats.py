"""Percentiles and rates from raw samples (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def us(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:.0f}"


def ratio(value: float, baseline: float) -> float:
    return math.nan if not baseline or math.isnan(baseline) else value / baseline


def growth(before: float, after: float) -> float:
    """Relative growth from `before` to `after` (0.05 = +5 %)."""
    return math.nan if not before else (after - before) / before
