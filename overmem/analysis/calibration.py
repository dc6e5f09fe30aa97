"""Calibration of sampled answers (paper App. D.1, eq. 5).

The confidence of one sampled generation is its mean token probability (1/T) sum_t p(y_t),
and the expected calibration error over n generations in M equal-width bins is

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

where acc(B_m) is the fraction correct and conf(B_m) the mean confidence of the generations in
B_m. Bin m (0-based) holds the confidences in (m/M, (m+1)/M]; confidence 0 goes to bin 0.
Empty bins contribute nothing.

A generation with no extractable answer is simply incorrect (`is_correct` is False) and keeps
its confidence. A generation with no tokens has no confidence (`sampling.sequence_confidence`
gives NaN), and the ECE functions refuse NaN: decide before binning whether to drop such
generations (`calibration_analysis` leaves them out and counts them).

`analysis.calibration.*`: the sampling settings (`data`, `size`, `n_samples`, `temperature`,
`top_p`) and `n_bins`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from ..data.example import Example
from ..results import read_jsonl
from .base import Analysis, AnalysisResult, Prepared, Progress, SampledSettings, register
from .figures import figure_exists, new_figure, save_figure
from .sampling import Decoding, sample_answers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


def plot_reliability(bins: ReliabilityBins, path: str | Path, title: str | None = None) -> list[Path]:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with ECE in the title.

    Bars are shaded by how many predictions fall in the bin (darker = more), as in the paper's
    Figure 7; empty bins have no bar. Saves `path` with suffixes .png and .svg and returns both paths.
    """
    fig = new_figure((4.2, 4.0))
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


def calibration_analysis(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    decoding: Decoding,
    *,
    n_bins: int = 10,
    score_batch_size: int = 16,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """ECE of sampled answers (paper App. D.1): confidence = mean token probability of the response.

    Empty responses have no confidence; they are left out of the ECE and counted in `n_empty`.
    Metrics: `ece`, `accuracy` and `confidence` (means over the binned responses), `n`, `n_empty`,
    and `bin_counts`, `bin_accuracy`, `bin_confidence` (lists, null for empty bins). One row per response.
    """
    rows = sample_answers(model, tokenizer, examples, decoding, score_batch_size=score_batch_size,
                          max_length=max_length, progress=progress)
    flat = [{"id": ex.id, "sample": j, "answer": ex.answer, **r} for ex, per in zip(examples, rows) for j, r in enumerate(per)]
    kept = [r for r in flat if r["n_tokens"] > 0]
    metrics: dict[str, Any] = {"n": len(kept), "n_empty": len(flat) - len(kept)}
    if kept:
        bins = reliability_bins([r["confidence"] for r in kept], [r["correct"] for r in kept], n_bins)
        metrics.update(ece=bins.ece, accuracy=float(np.mean([r["correct"] for r in kept])),
                       confidence=float(np.mean([r["confidence"] for r in kept])),
                       bin_counts=bins.counts.tolist(), bin_accuracy=_nan_to_none(bins.accuracy),
                       bin_confidence=_nan_to_none(bins.confidence))
    else:
        metrics.update(ece=None, accuracy=None, confidence=None)
    return AnalysisResult(metrics, flat)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


class CalibrationSettings(SampledSettings):
    size: int | None = Field(None, gt=0, description="seeded sample of queries (None: all)")
    n_bins: int = Field(10, gt=0)


@register
class Calibration(Analysis[CalibrationSettings]):
    name = "calibration"
    description = "ECE of sampled answers, confidence = mean token probability (App. D.1)"
    Settings = CalibrationSettings

    def prepare(self) -> Prepared:
        settings, examples = self.ctx.sampled(self.settings, self.name, n_bins=self.settings.n_bins,
                                              confidence="mean token probability of the sampled response")
        return Prepared(settings, examples, len(examples))

    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        cfg = self.ctx.cfg
        return calibration_analysis(model, tokenizer, data, self.ctx.decoding(self.settings), n_bins=self.settings.n_bins,
                                    score_batch_size=cfg.eval.batch_size, max_length=cfg.train.max_length,
                                    progress=progress)

    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        return [("ECE", "ece"), ("accuracy", "accuracy"), ("confidence", "confidence")]

    def figures(self, doc: dict[str, Any], fresh: set[str]) -> list[str]:
        """One reliability diagram per checkpoint; only new or missing ones are drawn."""
        figures = []
        for ckpt in doc["checkpoints"]:
            out = self.ctx.run.analysis_dir / "calibration" / f"{ckpt}_reliability"
            png = out.with_name(f"{out.name}.png")
            rows = [r for r in read_jsonl(self.ctx.run.root / doc["samples"][ckpt]) if r["n_tokens"] > 0]
            if not rows:
                continue
            if ckpt in fresh or not figure_exists(png):
                bins = reliability_bins([r["confidence"] for r in rows], [r["correct"] for r in rows],
                                        doc["settings"]["n_bins"])
                plot_reliability(bins, out, title=ckpt)
            figures.append(self.ctx.relative(png))
        return figures
