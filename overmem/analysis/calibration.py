"""Calibration of sampled answers (paper App. D.1, eq. 5).

The confidence of one sampled generation is its mean token probability (1/T) sum_t p(y_t),
and the expected calibration error over n generations in M equal-width bins is

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

where acc(B_m) is the fraction correct and conf(B_m) the mean confidence of the generations in
B_m. Bin m (0-based) holds the confidences in (m/M, (m+1)/M]; confidence 0 goes to bin 0.
Empty bins contribute nothing.

A generation with no extractable answer is simply incorrect (`is_correct` is False) and keeps
its confidence. A generation with no tokens has no confidence (`sequence_confidence` gives NaN),
and the ECE functions refuse NaN: decide before binning whether to drop such generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .figures import save_figure


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin summary of (confidence, correct) pairs; accuracy and confidence are NaN in empty bins."""

    edges: np.ndarray  # (M+1,) bin edges 0, 1/M, ..., 1
    counts: np.ndarray  # (M,) int, |B_m|
    accuracy: np.ndarray  # (M,) acc(B_m)
    confidence: np.ndarray  # (M,) conf(B_m)

    @property
    def n_bins(self) -> int:
        return int(self.counts.size)

    @property
    def ece(self) -> float:
        """sum_m |B_m| / n * |acc(B_m) - conf(B_m)| over the non-empty bins."""
        full = self.counts > 0
        weights = self.counts[full] / self.counts.sum()
        return float(np.sum(weights * np.abs(self.accuracy[full] - self.confidence[full])))


def reliability_bins(
    confidences: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[bool], n_bins: int = 10
) -> ReliabilityBins:
    """Group predictions into M = `n_bins` equal-width confidence bins (m/M, (m+1)/M].

    Confidences must lie in [0, 1]; `correct` is boolean (or 0/1) per prediction.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    corr = np.asarray(correct)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if conf.ndim != 1 or conf.shape != corr.shape:
        raise ValueError(f"confidences and correct must be 1-D and of equal length; got {conf.shape} and {corr.shape}")
    if conf.size == 0:
        raise ValueError("calibration needs at least one prediction")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("confidences must lie in [0, 1] (a generation with no tokens has NaN confidence: drop it)")
    if not np.isin(corr, (0, 1)).all():
        raise ValueError("correct must be boolean (or 0/1)")
    corr = corr.astype(np.float64)
    # Inner edges i/M are correctly rounded, so a confidence of exactly 0.3 lands in (0.2, 0.3].
    inner = np.arange(1, n_bins) / n_bins
    index = np.digitize(conf, inner, right=True)  # (n,) in [0, M-1]; 0 goes to bin 0
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=corr, minlength=n_bins) / counts
        confidence = np.bincount(index, weights=conf, minlength=n_bins) / counts
    return ReliabilityBins(np.arange(n_bins + 1) / n_bins, counts, accuracy, confidence)


def expected_calibration_error(
    confidences: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[bool], n_bins: int = 10
) -> float:
    """ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)| over `n_bins` equal-width bins (eq. 5)."""
    return reliability_bins(confidences, correct, n_bins).ece


def sequence_confidence(token_logprobs: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Confidence of one generation: mean token probability (1/T) sum_t exp(l_t); NaN if T = 0."""
    if isinstance(token_logprobs, torch.Tensor):
        token_logprobs = token_logprobs.detach().cpu().double().numpy()
    lp = np.asarray(token_logprobs, dtype=np.float64)
    return float(np.exp(lp).mean()) if lp.size else float("nan")


def plot_reliability(bins: ReliabilityBins, path: str | Path, title: str | None = None) -> list[Path]:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with ECE in the title.

    Bars are shaded by how many predictions fall in the bin (darker = more), as in the paper's
    Figure 7; empty bins have no bar. Saves `path` with suffixes .png and .svg and returns both paths.
    """
    fig = Figure(figsize=(4.2, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 1.0 / bins.n_bins
    full = bins.counts > 0  # empty bins have no accuracy: no bar
    density = bins.counts[full] / bins.counts.max()
    ax.bar(bins.edges[:-1][full], bins.accuracy[full], width=width, align="edge",
           color=[(0.12, 0.31, 0.61, 0.15 + 0.85 * d) for d in density], edgecolor="#1f4e9c", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="#7f7f7f", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean token probability)")
    ax.set_ylabel("accuracy")
    ece_text = f"ECE = {bins.ece:.3f}"
    ax.set_title(f"{title} ({ece_text})" if title else ece_text)
    ax.legend(loc="upper left")
    return save_figure(fig, path)
