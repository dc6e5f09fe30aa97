"""Confidence intervals: the one place accuracies and their intervals are computed (without torch, so that
commands that only grade, such as `overmem grade`, start fast)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # Resamples drawn in blocks of about 16 MiB of indices (the same draws as one block would be):
    # memory stays bounded whatever n_boot and the number of values.
    block = max(1, 2**21 // x.size)
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(block, n_boot - i), x.size))].mean(axis=1)
                            for i in range(0, n_boot, block)])
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def accuracy_interval(
    correct: Sequence[float], *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(accuracy, low, high): the mean of `correct` (1 / 0 per checked generation) and its
    percentile-bootstrap interval (`bootstrap_ci`); all three NaN when nothing was checked."""
    x = np.asarray(correct, dtype=np.float64)
    low, high = bootstrap_ci(x, n_boot=n_boot, confidence=confidence, seed=seed)
    return (float(x.mean()) if x.size else float("nan")), low, high
