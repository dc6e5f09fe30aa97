"""Membership inference attacks (paper App. D.2; scores as in mimir and zjysteven/mink-plus-plus).

Convention, for every score in this module: HIGHER = MORE likely a member (a text the model was
finetuned on). Members are labelled 1 in `roc_metrics`. No score is ever negated later.

All attacks read one teacher-forced forward pass (`token_stats`), which gives, for each scored
token x_t (the response, for SFT data):

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
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.example import Example
from ..scoring import IGNORE, TokenScores, length_sorted_batches, pad_id_of, pad_right

DEFAULT_KS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1, 0.2, ..., 1.0
DEFAULT_K = 0.2  # the value of k the Min-K% papers report by default
TARGET_FPR = 0.05  # TPR is reported at this false-positive rate
# float32 log-probs below this are exp() == 0 exactly; clamping there keeps 0 * (-inf) out of mu/sigma.
_LOGPROB_FLOOR = -1e4
_SIGMA_FLOOR = 1e-12  # a one-hot next-token distribution has sigma 0: z = 0 / floor, not 0 / 0


@dataclass
class TokenStats(TokenScores):
    """Per-token statistics of one text: log-prob of the actual token and of the whole vocabulary."""

    mu: torch.Tensor  # (T,) float32, sum_v p(v) log p(v) at each scored position
    sigma: torch.Tensor  # (T,) float32, standard deviation of log p(v) under p at each scored position


def _vocab_stats_(x: torch.Tensor, p: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """l, mu, sigma of n positions. In place: `x` (n, V) float32 logits is overwritten, `p` is scratch.

    Working in two caller-owned buffers means no (n, V) tensor is allocated per chunk: on CPU,
    freshly allocated and freed chunk-sized tensors fragment glibc's heap and can cost more
    resident memory than the chunking saves.
    """
    x.sub_(x.amax(dim=-1, keepdim=True))
    torch.exp(x, out=p)
    total = p.sum(dim=-1, keepdim=True)  # (n, 1)
    x.sub_(total.log())  # log-softmax: log p(v)
    p.div_(total)  # softmax: p(v)
    token_lp = x.gather(-1, target[:, None]).squeeze(-1)  # (n,)
    x.clamp_(min=_LOGPROB_FLOOR)
    # einsum reduces over V without an (n, V) temporary.
    mu = torch.einsum("nv,nv->n", p, x)
    # Centered form sum_v p (log p - mu)^2 (equal to sum p log^2 p - mu^2) avoids the
    # cancellation of the uncentered one when the distribution is flat.
    x.sub_(mu[:, None]).square_()
    var = torch.einsum("nv,nv->n", p, x)
    return token_lp, mu, var.clamp_(min=0).sqrt_()


@torch.inference_mode()
def token_stats(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 256
) -> list[TokenStats]:
    """One forward pass; per scored token l_t, mu_t and sigma_t (see the module docstring).

    `input_ids` and `labels` are (B, L) and right-padded (`overmem.scoring.pad_right`); labels
    are -100 where no token is scored, as in `overmem.scoring.encode_example`. Logits at
    position t score the label at t+1, exactly as `score_batch`, so `logprobs` agree with it.

    The (B, L, V) logits exist once, in the model's dtype; the float32 log-softmax and the
    vocabulary sums run over `chunk_size` scored tokens at a time in two reused float32
    buffers (plus one in the model's dtype if that is not float32), so the extra memory is
    2 * chunk_size * V * 4 bytes rather than several (B, L, V) float32 tensors.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if input_ids.shape != labels.shape or input_ids.ndim != 2:
        raise ValueError("input_ids and labels must both be (B, L); "
                         f"got {tuple(input_ids.shape)} and {tuple(labels.shape)}")
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device), labels.to(device)
    logits = model(input_ids=input_ids).logits  # (B, L, V), model dtype
    width, vocab = logits.shape[1], logits.shape[2]
    flat = logits.reshape(-1, vocab)  # (B*L, V), a view of the contiguous logits
    target = labels[:, 1:]  # (B, L-1): the token that logits[:, t] predicts
    keep = target != IGNORE
    # Row-major order: each example's scored tokens are contiguous and in sequence order.
    rows, cols = keep.nonzero(as_tuple=True)  # (N,), (N,)
    index, targets = rows * width + cols, target[rows, cols]  # (N,) rows of `flat`, their tokens
    n_buf = min(chunk_size, index.numel())
    x_buf = torch.empty(n_buf, vocab, dtype=torch.float32, device=device)
    p_buf = torch.empty_like(x_buf)
    gather_buf = x_buf  # rows of a 16-bit model's logits land in their own buffer, then convert
    if logits.dtype != torch.float32:
        gather_buf = torch.empty(n_buf, vocab, dtype=logits.dtype, device=device)
    parts = []
    for s in range(0, index.numel(), chunk_size):
        idx = index[s : s + chunk_size]
        n = idx.numel()
        torch.index_select(flat, 0, idx, out=gather_buf[:n])
        if gather_buf is not x_buf:
            x_buf[:n].copy_(gather_buf[:n])
        parts.append(_vocab_stats_(x_buf[:n], p_buf[:n], targets[s : s + chunk_size]))
    if parts:
        lp_all, mu_all, sigma_all = (torch.cat(xs) for xs in zip(*parts))
    else:
        lp_all = mu_all = sigma_all = torch.zeros(0, device=device)
    counts = keep.sum(dim=1).tolist()
    return [
        TokenStats(lp.cpu(), mu.cpu(), sigma.cpu())
        for lp, mu, sigma in zip(lp_all.split(counts), mu_all.split(counts), sigma_all.split(counts))
    ]


def example_token_stats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    chunk_size: int = 256,
) -> list[TokenStats]:
    """`token_stats` of each example's reference response (prompt masked), in input order.

    Encodes exactly as `overmem.scoring.score_examples`, so `logprobs` are the same numbers.
    """
    was_training = model.training
    model.eval()
    out: list[TokenStats | None] = [None] * len(examples)
    pad_id = pad_id_of(tokenizer)
    for idx, ids, labels in length_sorted_batches(tokenizer, examples, batch_size=batch_size, max_length=max_length):
        stats = token_stats(model, pad_right(ids, pad_id), pad_right(labels, IGNORE), chunk_size=chunk_size)
        for i, st in zip(idx, stats):
            out[i] = st
    model.train(was_training)
    return out  # type: ignore[return-value]


def _as_float64(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
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
