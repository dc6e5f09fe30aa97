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

`premem_checkpoint` gives one checkpoint's acc_t and ppl_t; PM_j needs the checkpoints up to j,
so the analysis combines them (`premem_summary`) after each checkpoint, exports the ranking of
training examples, and fits R^2 against test accuracy across runs (`premem_r2`).
`analysis.premem.*`: the sampling settings, `tau`, `compare_runs`, `test_split`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from pydantic import Field

from ..config import ConfigError
from ..data.example import Example, format_prompt
from ..results import RunDir, read_jsonl, write_jsonl
from .base import Analysis, AnalysisResult, Prepared, Progress, SampledSettings, register
from .figures import plot_curves
from .sampling import Decoding, check, decode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def premem_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    decoding: Decoding,
    *,
    tau: float,
    score_batch_size: int = 16,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """One checkpoint's inputs to pre-memorization accuracy (Kang et al.): per training example the
    sampled accuracy acc_t(i) over `decoding.n_samples` samples and the perplexity ppl_t(i) of its
    reference, and the mask m_t(i) = [log log ppl >= tau] (1 = not yet memorized).

    Metrics: `train_accuracy` (mean acc_t), `memorized` (fraction with m_t = 0), `ppl` (mean).
    PM_j needs every checkpoint up to j: `premem_summary` combines the checkpoints.
    """
    from ..scoring import score_examples

    prompts = [format_prompt(ex.question) for ex in examples]
    texts = check(examples, decode(model, tokenizer, prompts, decoding, progress, examples))
    ppl = np.array([s.ppl for s in score_examples(model, tokenizer, examples, batch_size=score_batch_size,
                                                  max_length=max_length)])
    mask = not_memorized_mask(ppl, tau)
    rows = []
    for ex, per, p, m in zip(examples, texts, ppl, mask):
        n_correct = sum(r["correct"] for r in per)
        rows.append({"id": ex.id, "acc": n_correct / len(per), "n_correct": n_correct, "ppl": float(p),
                     "not_memorized": bool(m), "extracted": [r["extracted"] for r in per]})
    accs = [r["acc"] for r in rows]
    metrics = {"train_accuracy": float(np.mean(accs)), "memorized": float(1 - mask.mean()),
               "ppl": float(ppl.mean()), "n": len(rows)}
    return AnalysisResult(metrics, rows)


def premem_summary(
    per_checkpoint: Sequence[Sequence[dict[str, Any]]], tau: float
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """PM_j over checkpoints in training order, from `premem_checkpoint` rows of each.

    Returns (PM mean per checkpoint (T,), PM per example at the last checkpoint (N,), example ids).
    Every checkpoint must cover the same examples in the same order.
    """
    ids = [r["id"] for r in per_checkpoint[0]]
    for rows in per_checkpoint[1:]:
        if [r["id"] for r in rows] != ids:
            raise ValueError("pre-memorization needs the same training examples at every checkpoint")
    acc = np.array([[r["acc"] for r in rows] for rows in per_checkpoint])  # (T, N)
    ppl = np.array([[r["ppl"] for r in rows] for rows in per_checkpoint])  # (T, N)
    result = pre_memorization_accuracy(acc, ppl, tau)
    return result.mean, result.per_example[-1], ids


def premem_r2(runs: Sequence[tuple[str | Path, Mapping[str, Any]]], test_split: str | None) -> dict[str, Any]:
    """R^2 of dataset PM against test accuracy (Kang et al.), one point per (run, checkpoint) that has
    both a PM value (in the run's premem.json content) and a `test_split` accuracy in its dynamics.

    Returns {"test_split", "points": [{"run", "checkpoint", "pm", "test_accuracy"}], "value"} with
    value null and a "reason" when R^2 is undefined or meaningless (fewer than 3 points, constant x or y).
    """
    points = []
    for run_root, doc in runs:
        acc = {r["checkpoint"]: r["accuracy"] for r in RunDir(run_root).read_dynamics()
               if r["split"] == test_split and r.get("accuracy") is not None}
        points += [{"run": str(run_root), "checkpoint": c, "pm": m["pm"], "test_accuracy": acc[c]}
                   for c, m in doc["checkpoints"].items() if m.get("pm") is not None and c in acc]
    out: dict[str, Any] = {"test_split": test_split, "points": points, "value": None}
    if len(points) < 3:  # a line fits two points exactly: R^2 = 1 says nothing
        out["reason"] = f"R^2 needs at least 3 (run, checkpoint) points, got {len(points)}"
        return out
    try:
        out["value"] = r_squared([p["pm"] for p in points], [p["test_accuracy"] for p in points])
    except ValueError as err:
        out["reason"] = str(err)
    return out


class PremSettings(SampledSettings):
    data: str | None = Field(None, description="training examples (default: the run's training set)")
    size: int | None = Field(200, gt=0, description="seeded sample of training examples (None: all)")
    n_samples: int = Field(5, gt=0)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    tau: float = Field(GSM8K_TAU, description="memorized once log(log(ppl)) < tau: -2.4 GSM8K, -1.7 MATH")
    compare_runs: list[str] = Field(default_factory=list, description="other run folders for the R^2")
    test_split: str | None = Field(None, description="test split of the R^2 (default: the first test)")


@register
class Premem(Analysis[PremSettings]):
    name = "premem"
    description = "Pre-memorization train accuracy (Kang et al. 2025)"
    Settings = PremSettings

    def prepare(self) -> Prepared:
        s, ctx = self.settings, self.ctx
        if s.data is None:
            pools = ctx.pools
            desc = f"the run's training set ({pools.train_desc})"
            examples = ctx.sample(pools.train, s.size)
        else:
            desc = s.data
            examples = ctx.load(s.data, s.size)
        test_split = s.test_split or (next(iter(ctx.cfg.data.tests)) if ctx.cfg.data.tests else None)
        for other in s.compare_runs:
            if not RunDir(other).config.exists():
                raise ConfigError(f"analysis.premem.compare_runs: {other} is not a run folder (no config.yaml)")
        settings = {"data": desc, "size": s.size, "n_samples": s.n_samples, "temperature": s.temperature,
                    "top_p": s.top_p, "tau": s.tau, "test_split": test_split, "compare_runs": list(s.compare_runs),
                    "batch_size": ctx.cfg.eval.batch_size, **ctx.common()}
        return Prepared(settings, examples, len(examples))

    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        s, cfg = self.settings, self.ctx.cfg
        return premem_checkpoint(model, tokenizer, data, self.ctx.decoding(s), tau=s.tau,
                                 score_batch_size=cfg.eval.batch_size, max_length=cfg.train.max_length,
                                 progress=progress)

    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        return [("train acc", "train_accuracy"), ("memorized", "memorized"), ("PM", "pm")]

    def finish(self, doc: dict[str, Any]) -> None:
        """PM_j over the checkpoints with a known training position, the ranking export, R^2."""
        run = self.ctx.run
        ordered = [c for c, m in doc["checkpoints"].items() if m.get("step") is not None]
        for m in doc["checkpoints"].values():
            m["pm"] = None
        if ordered:
            per_ckpt = [read_jsonl(run.root / doc["samples"][c]) for c in ordered]
            means, last, ids = premem_summary(per_ckpt, doc["settings"]["tau"])
            for c, v in zip(ordered, means):
                doc["checkpoints"][c]["pm"] = float(v)
            acc_last = {r["id"]: r["acc"] for r in per_ckpt[-1]}
            ranking = run.analysis_dir / "premem" / "ranking.jsonl"
            write_jsonl(ranking, [{"rank": i + 1, "id": ex_id, "pm": pm, "acc": acc_last[ex_id], "checkpoint": ordered[-1]}
                                  for i, (ex_id, pm) in enumerate(rank_examples(ids, last))])
            doc["ranking"] = self.ctx.relative(ranking)
        others = [(Path(r), RunDir(r).read_json(RunDir(r).analysis_json(self.name))) for r in doc["settings"]["compare_runs"]]
        doc["r2"] = premem_r2([(run.root, doc), *[(r, d) for r, d in others if d is not None]],
                              doc["settings"]["test_split"])

    def figures(self, doc: dict[str, Any], fresh: set[str]) -> list[str]:
        """PM and sampled train accuracy against the checkpoints in training order."""
        ordered = [c for c, m in doc["checkpoints"].items() if m.get("pm") is not None]
        if not ordered:
            return []
        x = list(range(len(ordered)))
        series = {label: (x, [doc["checkpoints"][c][key] for c in ordered])
                  for label, key in (("PM", "pm"), ("train accuracy", "train_accuracy"))}
        path = plot_curves({"pre-memorization accuracy": series}, self.ctx.run.analysis_dir / "premem",
                           xlabel="checkpoint (" + ", ".join(ordered) + ")")
        return [self.ctx.figure(path)]
