"""Confidence intervals: Wilson for one accuracy, paired bootstrap and exact McNemar for two models."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) when there is no data."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(
    base: list[bool], new: list[bool], num_resamples: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean difference new - base, 2.5th and 97.5th percentile of the resampled difference)."""
    assert len(base) == len(new) and base, "paired samples must align"
    diffs = np.array(new, dtype=float) - np.array(base, dtype=float)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (num_resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def mcnemar_exact(num_improved: int, num_regressed: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts."""
    n = num_improved + num_regressed
    if n == 0:
        return 1.0
    k = min(num_improved, num_regressed)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def bootstrap_interval(values: list[float], num_resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """2.5th and 97.5th percentile of the mean of `values` resampled over items."""
    if not values:
        return 0.0, 1.0
    array = np.array(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), (num_resamples, len(array)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def difference_outcome(low: float, high: float, margin: float = 0.0) -> str:
    """What a paired difference's 95% interval says against `margin`: 'better' (wholly above it), 'worse'
    (wholly below it) or 'unclear' (it holds the margin: no detectable difference)."""
    if low > margin:
        return "better"
    if high < margin:
        return "worse"
    return "unclear"


def items_to_tell(difference: float, low: float, high: float, num_items: int) -> int | None:
    """About how many paired items an interval around `difference` would need to clear zero, its width
    shrinking as 1/sqrt(items); None where there is no difference to tell."""
    half = (high - low) / 2
    if difference == 0 or half == 0:
        return None
    return math.ceil(round(num_items * (half / abs(difference)) ** 2, 6))
