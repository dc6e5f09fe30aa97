"""Calibration: ECE and reliability bins on hand-worked cases, bin edges, the confidence of a
generation, and the reliability figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from overmem.analysis.calibration import expected_calibration_error, plot_reliability, reliability_bins
from overmem.analysis.sampling import sequence_confidence
from overmem.data.answers import is_correct

CONF = [0.1, 0.35, 0.8, 0.95]
CORRECT = [False, True, True, False]


def test_ece_four_samples_by_hand():
    # Ten bins: each sample alone in its bin -> (|0-0.1| + |1-0.35| + |1-0.8| + |0-0.95|) / 4.
    assert expected_calibration_error(CONF, CORRECT, n_bins=10) == pytest.approx(1.9 / 4)
    # Two bins: (0, .5] holds 0.1, 0.35 (acc 0.5, conf 0.225); (.5, 1] holds 0.8, 0.95 (acc 0.5, conf 0.875).
    assert expected_calibration_error(CONF, CORRECT, n_bins=2) == pytest.approx(0.5 * 0.275 + 0.5 * 0.375)


def test_single_bin_is_gap_between_mean_accuracy_and_mean_confidence():
    assert expected_calibration_error(CONF, CORRECT, n_bins=1) == pytest.approx(abs(0.5 - 0.55))


def test_perfectly_calibrated_predictions_have_zero_ece():
    assert expected_calibration_error([0.5, 0.5, 1.0, 0.0], [1, 0, 1, 0], n_bins=10) == pytest.approx(0.0)


def test_bins_are_right_closed_and_zero_goes_to_the_first():
    bins = reliability_bins([0.0, 0.1, 0.3, 0.30001, 0.7, 1.0], [0, 1, 1, 0, 1, 1], n_bins=10)
    #  0.0 and 0.1 -> bin 0; 0.3 -> (0.2, 0.3] = bin 2; 0.30001 -> bin 3; 0.7 -> bin 6; 1.0 -> bin 9
    assert bins.counts.tolist() == [2, 0, 1, 1, 0, 0, 1, 0, 0, 1]
    np.testing.assert_allclose(bins.edges, np.linspace(0, 1, 11))
    assert bins.accuracy[0] == 0.5 and bins.confidence[0] == pytest.approx(0.05)
    assert np.isnan(bins.accuracy[1]) and np.isnan(bins.confidence[1])  # empty bin
    assert bins.ece == pytest.approx(expected_calibration_error([0.0, 0.1, 0.3, 0.30001, 0.7, 1.0], [0, 1, 1, 0, 1, 1]))


def test_every_edge_k_over_m_lands_in_the_bin_it_closes():
    for m in (3, 7, 10, 15):
        edges = [k / m for k in range(1, m + 1)]
        bins = reliability_bins(edges, [True] * m, n_bins=m)
        assert bins.counts.tolist() == [1] * m, m


def test_unanswerable_generations_count_as_incorrect():
    texts = ["so the answer is #### 12", "I cannot tell.", ""]
    correct = [is_correct(t, "12", "numeric")[1] for t in texts]
    assert correct == [True, False, False]
    # Confident on the unanswerable ones: three bins with gaps 0.1, 0.9, 0.8.
    ece = expected_calibration_error([0.9, 0.9, 0.8], correct, n_bins=10)
    assert ece == pytest.approx((abs(0.5 - 0.9) * 2 + 0.8) / 3)


def test_invalid_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error([float("nan")], [True])
    with pytest.raises(ValueError, match="at least one"):
        expected_calibration_error([], [])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [True], n_bins=0)
    with pytest.raises(ValueError, match="equal length"):
        expected_calibration_error([0.5, 0.2], [True])
    with pytest.raises(ValueError, match="boolean"):
        expected_calibration_error([0.5], [2])


def test_sequence_confidence_is_mean_token_probability():
    lp = [math.log(0.5), math.log(0.25), 0.0]
    assert sequence_confidence(lp) == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert sequence_confidence(torch.tensor(lp)) == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert math.isnan(sequence_confidence([]))  # an empty generation has no confidence


def test_plot_reliability_writes_png_and_svg(tmp_path):
    bins = reliability_bins(CONF, CORRECT, n_bins=10)
    paths = plot_reliability(bins, tmp_path / "figs" / "reliability", title="toy")
    assert [p.name for p in paths] == ["reliability.png", "reliability.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in paths[1].read_text()
