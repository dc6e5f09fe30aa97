"""Library runners of the diversity, calibration, MIA and pre-memorization analyses.

Each takes a model, its tokenizer, examples and settings, and returns an `AnalysisResult`
(aggregate metrics + one row per query or example), computing its numbers with the tested metric
functions of `diversity`, `calibration`, `mia` and `premem`. OOD and robustness live in `ood.py`
and `robustness.py`; `overmem.analysis.suite` runs any of them over a run's checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.example import Example, format_prompt
from ..scoring import score_examples
from . import calibration, diversity, mia, premem
from .sampling import AnalysisResult, Decoding, check, decode, sample_answers

# Best-of-N scorers: (questions (Q,), responses (Q, N) texts, sampled rows) -> (Q, N) scores.
Scorer = Callable[[Sequence[str], Sequence[Sequence[str]], Sequence[Sequence[dict[str, Any]]]], np.ndarray]
POLICY_LOGPROB = "policy_logprob"


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
    embed: Callable[[Sequence[str]], np.ndarray] | None = diversity.sbert_embed,
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
    eads = [diversity.ead_mean(t, vocab, tokenizer.tokenize, ns=ead_ns) for t in texts]
    sberts = [diversity.semantic_diversity(embed(t)) for t in texts] if embed is not None else None
    metrics: dict[str, Any] = {f"pass@{k}": v for k, v in diversity.pass_at_k_curve(correct, range(1, n + 1)).items()}
    metrics.update({f"bon@{k}": diversity.best_of_n(scores, correct, k) for k in range(1, n + 1)})
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
        bins = calibration.reliability_bins([r["confidence"] for r in kept], [r["correct"] for r in kept], n_bins)
        metrics.update(ece=bins.ece, accuracy=float(np.mean([r["correct"] for r in kept])),
                       confidence=float(np.mean([r["confidence"] for r in kept])),
                       bin_counts=bins.counts.tolist(), bin_accuracy=_nan_to_none(bins.accuracy),
                       bin_confidence=_nan_to_none(bins.confidence))
    else:
        metrics.update(ece=None, accuracy=None, confidence=None)
    return AnalysisResult(metrics, flat)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def mia_analysis(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    members: Sequence[Example],
    nonmembers: Sequence[Example],
    *,
    ks: Sequence[float] = mia.DEFAULT_KS,
    batch_size: int = 16,
    max_length: int = 2048,
) -> AnalysisResult:
    """Loss, Zlib, Min-K% and Min-K%++ (each k in `ks`) on the reference responses, from one forward
    pass per example (`mia.example_token_stats`); higher score = more likely a member.

    Metrics `<attack>/auroc` and `<attack>/tpr_at_5fpr` per attack (members labelled 1), plus
    `n_members`, `n_nonmembers` and `n_empty` (responses with no tokens, left out). One row per example.
    """
    examples = [*members, *nonmembers]
    labels = [1] * len(members) + [0] * len(nonmembers)
    stats = mia.example_token_stats(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    rows = [{"id": ex.id, "member": y, "n_tokens": st.n_tokens, **mia.all_scores(st, ex.response, ks)}
            for ex, y, st in zip(examples, labels, stats)]
    kept = [r for r in rows if r["n_tokens"] > 0]
    attacks = [k for k in rows[0] if k not in ("id", "member", "n_tokens")] if rows else []
    metrics: dict[str, Any] = {"n_members": sum(r["member"] for r in kept),
                               "n_nonmembers": sum(1 - r["member"] for r in kept), "n_empty": len(rows) - len(kept)}
    y = [r["member"] for r in kept]
    for attack in attacks:
        roc = mia.roc_metrics([r[attack] for r in kept], y)
        metrics[f"{attack}/auroc"] = roc["auroc"]
        metrics[f"{attack}/tpr_at_5fpr"] = roc["tpr_at_5fpr"]
    return AnalysisResult(metrics, rows)


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
    prompts = [format_prompt(ex.question) for ex in examples]
    texts = check(examples, decode(model, tokenizer, prompts, decoding, progress))
    ppl = np.array([s.ppl for s in score_examples(model, tokenizer, examples, batch_size=score_batch_size,
                                                  max_length=max_length)])
    mask = premem.not_memorized_mask(ppl, tau)
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
    result = premem.pre_memorization_accuracy(acc, ppl, tau)
    return result.mean, result.per_example[-1], ids
