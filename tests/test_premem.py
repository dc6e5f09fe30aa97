"""Pre-memorization train accuracy on a hand-worked example, the memorization threshold, R^2
and the curation ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from overmem.analysis.premem import (
    GSM8K_TAU,
    MATH_TAU,
    not_memorized_mask,
    pre_memorization_accuracy,
    r_squared,
    rank_examples,
)


def test_threshold_matches_the_perplexities_quoted_by_kang_et_al():
    assert math.exp(math.exp(GSM8K_TAU)) == pytest.approx(1.095, abs=1e-3)
    assert math.exp(math.exp(MATH_TAU)) == pytest.approx(1.20, abs=5e-3)
    # loglog: 1.05 -> -3.02 (memorized), 1.2 -> -1.70, 3.0 -> 0.094 (not memorized)
    assert not_memorized_mask([1.05, 1.2, 3.0], GSM8K_TAU).tolist() == [False, True, True]
    assert not_memorized_mask([[1.1, 1.19]], MATH_TAU).tolist() == [[False, False]]


def test_perplexity_at_or_below_one_counts_as_memorized():
    assert not_memorized_mask([1.0, 0.999, 1e-9], tau=-100.0).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="NaN"):
        not_memorized_mask([float("nan")], GSM8K_TAU)


def test_pre_memorization_accuracy_by_hand():
    # Three checkpoints (rows) x two training examples (columns); tau = -2.4, so ppl 1.01 is memorized.
    acc = [[0.2, 0.4],
           [0.6, 0.2],
           [0.8, 1.0]]
    ppl = [[2.0, 3.0],
           [1.5, 1.01],
           [1.01, 1.01]]
    # example 0: m = 1,1,0 -> acc*m = .2,.6,0 -> running max .2,.6,.6 -> min with acc: .2,.6,.6
    # example 1: m = 1,0,0 -> acc*m = .4,0,0 -> running max .4,.4,.4 -> min with acc: .4,.2,.4
    pm = pre_memorization_accuracy(acc, ppl, GSM8K_TAU)
    np.testing.assert_allclose(pm.per_example, [[0.2, 0.4], [0.6, 0.2], [0.6, 0.4]])
    np.testing.assert_allclose(pm.mean, [0.3, 0.4, 0.5])


def test_pre_memorization_accuracy_matches_a_loop_over_the_definition():
    rng = np.random.default_rng(0)
    acc = rng.integers(0, 6, size=(7, 11)) / 5  # 5 samples per example
    ppl = 1 + rng.exponential(0.15, size=(7, 11))
    m = np.log(np.log(ppl)) >= GSM8K_TAU
    expected = np.array([[min(max(acc[t, i] * m[t, i] for t in range(j + 1)), acc[j, i]) for i in range(11)]
                         for j in range(7)])
    pm = pre_memorization_accuracy(acc, ppl, GSM8K_TAU)
    np.testing.assert_allclose(pm.per_example, expected)
    np.testing.assert_allclose(pm.mean, expected.mean(axis=1))


def test_pre_memorization_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        pre_memorization_accuracy([[0.5, 0.5]], [[2.0]], GSM8K_TAU)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pre_memorization_accuracy([[1.5]], [[2.0]], GSM8K_TAU)


def test_r_squared_by_hand():
    # y = [0, 2, 1] on x = [0, 1, 2]: line 0.5 + 0.5x, SS_res = 1.5, SS_tot = 2.
    assert r_squared([0, 1, 2], [0, 2, 1]) == pytest.approx(0.25)
    assert r_squared([0.1, 0.3, 0.2, 0.5], [0.2, 0.6, 0.4, 1.0]) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    x = rng.random(20)
    y = 0.8 * x + rng.normal(scale=0.1, size=20)
    assert r_squared(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)


def test_r_squared_undefined_cases():
    with pytest.raises(ValueError, match="constant"):
        r_squared([1, 2, 3], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="constant"):
        r_squared([1, 1, 1], [0.1, 0.5, 0.2])
    with pytest.raises(ValueError, match=">= 2"):
        r_squared([1], [1])


def test_rank_examples_lowest_first_ties_in_input_order():
    ranked = rank_examples(["a", "b", "c", "d"], [0.6, 0.2, 0.6, 0.0])
    assert ranked == [("d", 0.0), ("b", 0.2), ("a", 0.6), ("c", 0.6)]
    with pytest.raises(ValueError, match="one PM value per id"):
        rank_examples(["a"], [0.1, 0.2])
