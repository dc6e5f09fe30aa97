"""Membership inference attacks (paper App. D.2; scores as in mimir and zjysteven/mink-plus-plus).

Convention, for every score in this module: HIGHER = MORE likely a member (a text the model was
finetuned on). Members are labelled 1 in `roc_metrics`. No score is ever negated later.

All attacks read one teacher-forced forward pass (`overmem.scoring.score_examples` with
`vocab_stats=True`), which gives, for each scored token x_t (the response, for SFT data):

    l_t      = log p(x_t | x_<t)
    mu_t     = sum_v p(v) log p(v)                      (minus the entropy at position t)
    sigma_t  = sqrt(sum_v p(v) (log p(v))^2 - mu_t^2)   (spread of log p under p)

and the attacks are

    loss      mean_t l_t
    zlib      mean_t l_t / len(zlib.compress(text.encode("utf-8")))
    min_k     mean of the floor(k*T) smallest l_t
    min_k++   mean of the floor(k*T) smallest z_t = (l_t - mu_t) / sigma_t

With T scored tokens, the number of tokens kept by min_k / min_k++ is max(1, floor(k*T)): for a
short text with k*T < 1 the single least likely token is used rather than none (the reference
code would average an empty set and return NaN). An empty text (T = 0) scores NaN everywhere,
and `roc_metrics` refuses NaN, so empty texts must be dropped before evaluation.

`analysis.mia.*`: `members` (default: the run's training set), `nonmembers` (default: the unseen
rest of its source; `synthetic:nonmembers` for a run trained on `synthetic`), `size`, `ks`, `k`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, field_validator

from ..config import AnalysisSettings, ConfigError
from ..data.example import Example
from ..results import read_jsonl
from .base import Analysis, AnalysisResult, Prepared, Progress, register
from .figures import plot_roc

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..scoring import TokenStats

DEFAULT_KS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1, 0.2, ..., 1.0
DEFAULT_K = 0.2  # the value of k the Min-K% papers report by default
TARGET_FPR = 0.05  # TPR is reported at this false-positive rate
_SIGMA_FLOOR = 1e-12  # a one-hot next-token distribution has sigma 0: z = 0 / floor, not 0 / 0


def _as_float64(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    import torch

    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of per-token values, got shape {arr.shape}")
    return arr


def n_lowest(n_tokens: int, k: float) -> int:
    """How many tokens Min-K% keeps: max(1, floor(k * T)) (so 1 for an empty text, which scores NaN).

    A 1e-9 slack keeps float error from losing a token (0.29 * 100 is 28.999999999999996).
    """
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction of tokens in (0, 1], got {k}")
    return max(1, math.floor(k * n_tokens + 1e-9))


def _mean_lowest(values: np.ndarray, k: float) -> float:
    m = n_lowest(values.size, k)
    if values.size == 0:
        return float("nan")
    return float(np.partition(values, m - 1)[:m].mean())


def loss_score(logprobs: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Loss attack: mean_t l_t (the negative mean NLL; a member has low loss, so a high score)."""
    lp = _as_float64(logprobs)
    return float(lp.mean()) if lp.size else float("nan")


def zlib_score(logprobs: torch.Tensor | np.ndarray | Sequence[float], text: str) -> float:
    """Zlib attack: mean_t l_t / len(zlib.compress(text.encode("utf-8"))).

    Divides the (negative) mean log-likelihood by the text's zlib-compressed length in bytes, so
    a text that is likely for its complexity scores high. `text` is the scored text (the response).
    """
    return loss_score(logprobs) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(logprobs: torch.Tensor | np.ndarray | Sequence[float], k: float = DEFAULT_K) -> float:
    """Min-K%: mean of the max(1, floor(k*T)) smallest l_t (a member has few unlikely tokens)."""
    return _mean_lowest(_as_float64(logprobs), k)


def min_k_plus_plus_score(
    logprobs: torch.Tensor | np.ndarray | Sequence[float],
    mu: torch.Tensor | np.ndarray | Sequence[float],
    sigma: torch.Tensor | np.ndarray | Sequence[float],
    k: float = DEFAULT_K,
) -> float:
    """Min-K%++: mean of the max(1, floor(k*T)) smallest z_t = (l_t - mu_t) / sigma_t.

    z_t measures how far the actual token's log-prob lies above the expected log-prob at that
    position, in units of its spread. sigma_t == 0 (a one-hot distribution) is floored at 1e-12.
    """
    lp, m, s = _as_float64(logprobs), _as_float64(mu), _as_float64(sigma)
    if not lp.shape == m.shape == s.shape:
        raise ValueError(f"logprobs, mu and sigma must have one value per token; got {lp.shape}, {m.shape}, {s.shape}")
    return _mean_lowest((lp - m) / np.maximum(s, _SIGMA_FLOOR), k)


def score_name(attack: str, k: float | None = None) -> str:
    """Key of an attack in `all_scores`: "loss", "zlib", "min_k@0.2", "min_k++@0.2"."""
    return attack if k is None else f"{attack}@{k:g}"


def all_scores(stats: TokenStats, text: str, ks: Sequence[float] = DEFAULT_KS) -> dict[str, float]:
    """Every attack on one text: loss, zlib, and min_k / min_k++ for each k in `ks`."""
    out = {"loss": loss_score(stats.logprobs), "zlib": zlib_score(stats.logprobs, text)}
    for k in ks:
        out[score_name("min_k", k)] = min_k_score(stats.logprobs, k)
    for k in ks:
        out[score_name("min_k++", k)] = min_k_plus_plus_score(stats.logprobs, stats.mu, stats.sigma, k)
    return out


def roc_metrics(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> dict[str, object]:
    """AUROC and TPR at 5% FPR of a membership score (members labelled 1, higher = member).

    Returns {"auroc": float, "tpr_at_5fpr": float, "fpr": (P,) array, "tpr": (P,) array} with the
    full ROC curve (sklearn `roc_curve`, no points dropped). TPR@5%FPR is the largest TPR at any
    threshold whose FPR <= 0.05. Raises ValueError unless both members and non-members are present.
    """
    try:
        from sklearn.metrics import roc_auc_score, roc_curve
    except ImportError as err:
        raise ImportError("ROC metrics need scikit-learn: pip install overmem[analysis]") from err
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be 1-D and of equal length; got {s.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 1 (member) or 0 (non-member)")
    if y.size == 0 or y.min() == y.max():
        present = "no examples" if y.size == 0 else ("only members" if y[0] == 1 else "only non-members")
        raise ValueError(f"ROC metrics need both members (1) and non-members (0); got {present}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite; drop empty texts (their scores are NaN) first")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "tpr_at_5fpr": float(tpr[fpr <= TARGET_FPR].max()),
        "fpr": fpr,
        "tpr": tpr,
    }


def mia_analysis(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    members: Sequence[Example],
    nonmembers: Sequence[Example],
    *,
    ks: Sequence[float] = DEFAULT_KS,
    batch_size: int = 16,
    max_length: int = 2048,
) -> AnalysisResult:
    """Loss, Zlib, Min-K% and Min-K%++ (each k in `ks`) on the reference responses, from one forward
    pass per example (`score_examples` with `vocab_stats`); higher score = more likely a member.

    Metrics `<attack>/auroc` and `<attack>/tpr_at_5fpr` per attack (members labelled 1), plus
    `n_members`, `n_nonmembers` and `n_empty` (responses with no tokens, left out). One row per example.
    """
    from ..scoring import score_examples

    examples = [*members, *nonmembers]
    labels = [1] * len(members) + [0] * len(nonmembers)
    stats = score_examples(model, tokenizer, examples, batch_size=batch_size, max_length=max_length, vocab_stats=True)
    rows = [{"id": ex.id, "member": y, "n_tokens": st.n_tokens, **all_scores(st, ex.response, ks)}
            for ex, y, st in zip(examples, labels, stats)]
    kept = [r for r in rows if r["n_tokens"] > 0]
    attacks = [k for k in rows[0] if k not in ("id", "member", "n_tokens")] if rows else []
    metrics: dict[str, Any] = {"n_members": sum(r["member"] for r in kept),
                               "n_nonmembers": sum(1 - r["member"] for r in kept), "n_empty": len(rows) - len(kept)}
    y = [r["member"] for r in kept]
    for attack in attacks:
        roc = roc_metrics([r[attack] for r in kept], y)
        metrics[f"{attack}/auroc"] = roc["auroc"]
        metrics[f"{attack}/tpr_at_5fpr"] = roc["tpr_at_5fpr"]
    return AnalysisResult(metrics, rows)


SYNTHETIC_NONMEMBERS = "synthetic:nonmembers"


class MiaSettings(AnalysisSettings):
    members: str | None = Field(None, description="member spec (default: the run's training set)")
    nonmembers: str | None = Field(None, description="non-member spec (default: the unseen rest of its source; synthetic:nonmembers for a run trained on synthetic)")
    size: int = Field(500, gt=0, description="members and non-members each, capped by availability")
    ks: list[float] = Field(default_factory=lambda: list(DEFAULT_KS))
    k: float = Field(DEFAULT_K, gt=0, le=1, description="k of Min-K% / Min-K%++ in the table")

    @field_validator("ks")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or not all(0 < k <= 1 for k in v):
            raise ValueError("every k must lie in (0, 1]")
        return v


@register
class Mia(Analysis[MiaSettings]):
    name = "mia"
    description = "Membership inference on training vs unseen references (App. D.2, Table 7)"
    Settings = MiaSettings

    def prepare(self) -> Prepared:
        s, ctx = self.settings, self.ctx
        members, members_desc = self._members()
        nonmembers, nonmembers_desc = self._nonmembers()
        if not members or not nonmembers:
            which, desc = ("members", members_desc) if not members else ("nonmembers", nonmembers_desc)
            raise ConfigError(f"analysis.mia.{which}: no examples ({desc})")
        members, nonmembers = ctx.sample(members, s.size), ctx.sample(nonmembers, s.size)
        if s.k not in s.ks:
            raise ConfigError(f"analysis.mia.k: {s.k} is not among analysis.mia.ks {s.ks}")
        settings = {"members": members_desc, "nonmembers": nonmembers_desc, "size": s.size, "n_members": len(members),
                    "n_nonmembers": len(nonmembers), "ks": list(s.ks), "k": s.k, "scored": "reference responses",
                    "score_direction": "higher = more likely a member", "batch_size": ctx.cfg.eval.batch_size,
                    **ctx.common()}
        return Prepared(settings, (members, nonmembers), 0)

    def _members(self) -> tuple[list[Example], str]:
        if self.settings.members:
            return self.ctx.load(self.settings.members), self.settings.members
        pools = self.ctx.pools
        return pools.train, f"the run's training set ({pools.train_desc})"

    def _nonmembers(self) -> tuple[list[Example], str]:
        if self.settings.nonmembers:
            return self.ctx.load(self.settings.nonmembers), self.settings.nonmembers
        if self.ctx.train_source == "synthetic":
            # The generator's own pool: worded like its training split (per item kind), which the
            # validation and test references are not, so that members and non-members differ only
            # in having been trained on.
            return self.ctx.load(SYNTHETIC_NONMEMBERS), SYNTHETIC_NONMEMBERS
        pools = self.ctx.pools
        if pools.unseen is None:
            raise ConfigError(f"{pools.unseen_desc}; set analysis.mia.nonmembers")
        return pools.unseen, f"unseen: {pools.unseen_desc}"

    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        members, nonmembers = data
        cfg = self.ctx.cfg
        return mia_analysis(model, tokenizer, members, nonmembers, ks=self.settings.ks,
                            batch_size=cfg.eval.batch_size, max_length=cfg.train.max_length)

    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        return [(f"{a} {label}", f"{a}/{key}") for a in _table_attacks(settings)
                for label, key in (("AUROC", "auroc"), ("TPR@5%FPR", "tpr_at_5fpr"))]

    def figures(self, doc: dict[str, Any], fresh: set[str]) -> list[str]:
        """ROC curves of the table's attacks, one panel per attack, one curve per checkpoint."""
        curves: dict[str, dict[str, tuple]] = {a: {} for a in _table_attacks(doc["settings"])}
        for ckpt in doc["checkpoints"]:
            rows = [r for r in read_jsonl(self.ctx.run.root / doc["samples"][ckpt]) if r["n_tokens"] > 0]
            for attack in curves:
                roc = roc_metrics([r[attack] for r in rows], [r["member"] for r in rows])
                curves[attack][ckpt] = (roc["fpr"], roc["tpr"], roc["auroc"])
        return [self.ctx.figure(plot_roc(curves, self.ctx.run.analysis_dir / "mia_roc"))]


def _table_attacks(settings: Mapping[str, Any]) -> list[str]:
    k = settings["k"]
    return ["loss", "zlib", score_name("min_k", k), score_name("min_k++", k)]
