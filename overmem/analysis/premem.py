"""Pre-memorization train accuracy (Kang et al. 2025, arXiv 2411.07681; from their public code).

For checkpoints t = 0..T-1 and training examples i:

    acc_t(i)  fraction of correct samples on training query i (n = 5 samples, temperature 0.8,
              top_p 0.95 in the paper)
    ppl_t(i)  perplexity of i's reference solution
    m_t(i)    = [log(log(ppl_t(i))) >= tau]   1 while i is NOT yet memorized
    PM_j(i)   = min(max_{t<=j} acc_t(i) * m_t(i), acc_j(i))

PM_j(i) is the best accuracy the model reached on i at a checkpoint where it had not yet
memorized i's reference, capped by its current accuracy. The dataset value at checkpoint j is
the mean of PM_j(i) over i; across training runs it predicts test accuracy with R^2 ~ 0.9.

Memorization is a perplexity threshold: tau = -2.4 for GSM8K (ppl >= ~1.095 is not memorized)
and -1.7 for MATH (ppl >= ~1.20). When ppl <= 1, log(ppl) <= 0 and log(log(ppl)) is undefined
(-inf at ppl = 1); such a reference is reproduced exactly, so it counts as memorized (m = 0).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

GSM8K_TAU = -2.4
MATH_TAU = -1.7


class PreMemorization(NamedTuple):
    """Pre-memorization accuracy per checkpoint and example, and its dataset mean per checkpoint."""

    per_example: np.ndarray  # (T, N), PM_j(i)
    mean: np.ndarray  # (T,), mean over examples


def not_memorized_mask(ppl: np.ndarray | Sequence[float], tau: float) -> np.ndarray:
    """m = [log(log(ppl)) >= tau], elementwise; ppl <= 1 gives False (memorized). NaN is refused."""
    p = np.asarray(ppl, dtype=np.float64)
    if np.isnan(p).any():
        raise ValueError("perplexity is NaN (a reference with no tokens?): it has no memorization status")
    out = np.zeros(p.shape, dtype=bool)
    above = p > 1
    out[above] = np.log(np.log(p[above])) >= tau
    return out


def pre_memorization_accuracy(
    acc: np.ndarray | Sequence[Sequence[float]], ppl: np.ndarray | Sequence[Sequence[float]], tau: float
) -> PreMemorization:
    """PM_j(i) = min(max_{t<=j} acc_t(i) * m_t(i), acc_j(i)) for (T checkpoints, N examples) arrays.

    Rows of `acc` and `ppl` are checkpoints in training order; columns are training examples.
    """
    a = np.asarray(acc, dtype=np.float64)
    p = np.asarray(ppl, dtype=np.float64)
    if a.ndim != 2 or a.shape != p.shape or a.size == 0:
        raise ValueError("acc and ppl must be non-empty (checkpoints, examples) arrays of one shape; "
                         f"got {a.shape} and {p.shape}")
    if np.isnan(a).any() or (a < 0).any() or (a > 1).any():
        raise ValueError("accuracies must lie in [0, 1]")
    best_unmemorized = np.maximum.accumulate(a * not_memorized_mask(p, tau), axis=0)  # (T, N)
    pm = np.minimum(best_unmemorized, a)
    return PreMemorization(pm, pm.mean(axis=1))


def r_squared(x: np.ndarray | Sequence[float], y: np.ndarray | Sequence[float]) -> float:
    """Coefficient of determination of the least-squares line y ~ a + b x: 1 - SS_res / SS_tot.

    For one predictor this equals the squared Pearson correlation. Used for dataset PM (x)
    against test accuracy (y), one point per training run or checkpoint.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2:
        raise ValueError(f"x and y must be 1-D, of equal length >= 2; got {xs.shape} and {ys.shape}")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("x and y must be finite")
    ss_tot = np.sum((ys - ys.mean()) ** 2)
    if ss_tot == 0 or np.all(xs == xs[0]):
        raise ValueError("R^2 is undefined when x or y is constant")
    slope, intercept = np.polyfit(xs, ys, deg=1)
    ss_res = np.sum((ys - (intercept + slope * xs)) ** 2)
    return float(1.0 - ss_res / ss_tot)


def rank_examples(ids: Sequence[Hashable], pm: np.ndarray | Sequence[float]) -> list[tuple[Hashable, float]]:
    """(id, PM) pairs from lowest to highest pre-memorization accuracy; ties keep input order.

    Kang et al. curate data by prioritising examples with LOW pre-memorization accuracy, so
    the head of this list is what to collect more of (or upweight) first.
    """
    values = np.asarray(pm, dtype=np.float64)
    if values.ndim != 1 or len(ids) != values.size:
        raise ValueError(f"need one PM value per id; got {len(ids)} ids and shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError("PM values must not be NaN")
    order = np.argsort(values, kind="stable")
    return [(ids[i], float(values[i])) for i in order]
