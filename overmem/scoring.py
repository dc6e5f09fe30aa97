"""The one teacher-forced forward pass: per-token log-probabilities of reference responses.

Every perplexity, and every analysis that needs token probabilities, reads from `score_batch`
so the numbers agree across the tool. Prompt and response are tokenized separately and
concatenated, so the response tokens scored are exactly the tokens trained on.

Every pass also gives, per scored token, two cheap signals of the whole next-token distribution p
(the reference token y_t's rank and the distribution's entropy; "Forecasting Downstream LLM
Performance With Token-Level Proxy Metrics", 2026, finds such signals on expert-written solutions
forecast accuracy better than cross-entropy):

    rank_t   = 1 + #{v : p(v) > p(y_t)}                 (1: y_t is the greedy choice; ties count for y_t)
    H_t      = -sum_v p(v) log p(v)                     (predictive entropy, nats)

With `vocab_stats=True` it also gives the statistics Min-K%++ (`overmem.analysis.mia`) needs:

    mu_t     = sum_v p(v) log p(v)                      (= -H_t)
    sigma_t  = sqrt(sum_v p(v) (log p(v) - mu_t)^2)     (spread of log p under p)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data.encoding import IGNORE, length_sorted_batches, pad_id_of, pad_right
from .data.example import Example
from .generation import context_of
from .vllm_backend import VLLM_REQUEST, VllmModel, is_vllm

# float32 log-probs below this are exp() == 0 exactly; clamping there keeps 0 * (-inf) out of mu/sigma.
_LOGPROB_FLOOR = -1e4
VOCAB_CHUNK = 256  # scored tokens per step of the vocabulary statistics


@dataclass
class TokenScores:
    """Scores of one reference response: `logprobs` has one entry per scored token. `truncated`:
    the example did not fit `max_length` and was cut (`overmem.data.encoding.fit_lengths`)."""

    logprobs: torch.Tensor  # (T,) float32, log p(y_t | x, y_<t)
    truncated: bool = field(default=False, kw_only=True)
    ranks: torch.Tensor | None = field(default=None, kw_only=True)  # (T,) int64, rank_t; None: not computed (vLLM)
    entropy: torch.Tensor | None = field(default=None, kw_only=True)  # (T,) float32, H_t; None: not computed

    @property
    def n_tokens(self) -> int:
        return int(self.logprobs.numel())

    @property
    def nll_sum(self) -> float:
        return float(-self.logprobs.sum())

    @property
    def ppl(self) -> float:
        # exp(-(1/|y|) sum_t log p(y_t)); an empty response has no perplexity.
        return math.exp(self.nll_sum / self.n_tokens) if self.n_tokens else float("nan")


@dataclass
class TokenStats(TokenScores):
    """Scores of one reference response with the vocabulary statistics of each scored position."""

    mu: torch.Tensor  # (T,) float32, sum_v p(v) log p(v) at each scored position
    sigma: torch.Tensor  # (T,) float32, standard deviation of log p(v) under p at each scored position


@torch.inference_mode()
def score_batch(
    model: PreTrainedModel,
    batch_ids: Sequence[list[int]],
    batch_labels: Sequence[list[int]],
    pad_id: int,
    *,
    vocab_stats: bool = False,
    chunk_size: int = VOCAB_CHUNK,
) -> list[TokenScores]:
    """One batched forward pass (right padding); log-probs of every labelled token, and with
    `vocab_stats` also mu and sigma of each labelled position (`TokenStats`, see the module docstring).

    No attention mask is passed: with right padding, causal attention already keeps every
    real token from seeing the padding after it, and positions start at 0 in every row, so
    the scores are exact and the model takes its fastest (purely causal) attention path.
    """
    if len(batch_ids) != len(batch_labels) or any(len(i) != len(y) for i, y in zip(batch_ids, batch_labels)):
        raise ValueError("batch_ids and batch_labels must have the same number of rows and the same length per row")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = next(model.parameters()).device
    input_ids = pad_right(batch_ids, pad_id).to(device)  # (B, T)
    labels = pad_right(batch_labels, IGNORE).to(device)  # (B, T)
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    # Position t predicts token t+1: score only the labelled (response) positions.
    target = labels[:, 1:]
    keep = target != IGNORE  # (B, T-1)
    counts = keep.sum(dim=1).tolist()
    if vocab_stats:
        lp, mu, sigma, ranks = (x.cpu().split(counts) for x in _vocab_stats(logits, target, keep, chunk_size))
        return [TokenStats(l, m, sd, ranks=r, entropy=-m) for l, m, sd, r in zip(lp, mu, sigma, ranks)]
    picked = logits[:, :-1][keep].float()  # (N, V), N = labelled tokens in the batch
    targets = target[keep]  # (N,)
    lp = -F.cross_entropy(picked, targets, reduction="none")  # (N,)
    ranks, entropy = _rank_entropy(picked, targets, chunk_size)
    return [TokenScores(a.cpu(), ranks=r.cpu(), entropy=h.cpu())
            for a, r, h in zip(lp.split(counts), ranks.split(counts), entropy.split(counts))]


def _rank_entropy(picked: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rank_t and H_t (module docstring) of (N, V) float32 logits and their (N,) reference tokens,
    `chunk_size` rows at a time (each chunk's (n, V) temporaries, not N's)."""
    ranks, entropy = [], []
    for s in range(0, picked.shape[0], chunk_size):
        x, y = picked[s : s + chunk_size], targets[s : s + chunk_size]
        ranks.append((x > x.gather(-1, y[:, None])).sum(dim=-1) + 1)  # (n,)
        logp = x.log_softmax(dim=-1)  # (n, V)
        entropy.append(-torch.einsum("nv,nv->n", logp.exp(), logp.clamp(min=_LOGPROB_FLOOR)))
    if not ranks:
        return torch.zeros(0, dtype=torch.long, device=picked.device), torch.zeros(0, device=picked.device)
    return torch.cat(ranks), torch.cat(entropy)


def _vocab_stats(
    logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(l, mu, sigma, rank), each (N,), of the N kept positions of (B, L, V) `logits`, in row-major order.

    The (B, L, V) logits exist once, in the model's dtype; the float32 log-softmax and the
    vocabulary sums run over `chunk_size` scored tokens at a time in two reused float32
    buffers (plus one in the model's dtype if that is not float32), so the extra memory is
    2 * chunk_size * V * 4 bytes rather than several (B, L, V) float32 tensors.
    """
    width, vocab = logits.shape[1], logits.shape[2]
    flat = logits.reshape(-1, vocab)  # (B*L, V), a view of the contiguous logits
    # Row-major order: each example's scored tokens are contiguous and in sequence order.
    rows, cols = keep.nonzero(as_tuple=True)  # (N,), (N,)
    index, targets = rows * width + cols, target[rows, cols]  # (N,) rows of `flat`, their tokens
    if index.numel() == 0:
        empty = torch.zeros(0, device=logits.device)
        return empty, empty, empty, torch.zeros(0, dtype=torch.long, device=logits.device)
    n_buf = min(chunk_size, index.numel())
    x_buf = torch.empty(n_buf, vocab, dtype=torch.float32, device=logits.device)
    p_buf = torch.empty_like(x_buf)
    gather_buf = x_buf  # rows of a 16-bit model's logits land in their own buffer, then convert
    if logits.dtype != torch.float32:
        gather_buf = torch.empty(n_buf, vocab, dtype=logits.dtype, device=logits.device)
    parts = []
    for s in range(0, index.numel(), chunk_size):
        idx = index[s : s + chunk_size]
        n = idx.numel()
        torch.index_select(flat, 0, idx, out=gather_buf[:n])
        if gather_buf is not x_buf:
            x_buf[:n].copy_(gather_buf[:n])
        parts.append(_vocab_stats_(x_buf[:n], p_buf[:n], targets[s : s + chunk_size]))
    lp, mu, sigma, rank = (torch.cat(xs) for xs in zip(*parts))
    return lp, mu, sigma, rank


def _vocab_stats_(x: torch.Tensor, p: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """l, mu, sigma, rank of n positions. In place: `x` (n, V) float32 logits is overwritten, `p` is scratch.

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
    rank = (x > token_lp[:, None]).sum(dim=-1) + 1  # (n,), before the clamp can merge tiny log-probs
    x.clamp_(min=_LOGPROB_FLOOR)
    # einsum reduces over V without an (n, V) temporary.
    mu = torch.einsum("nv,nv->n", p, x)
    # Centered form sum_v p (log p - mu)^2 (equal to sum p log^2 p - mu^2) avoids the
    # cancellation of the uncentered one when the distribution is flat.
    x.sub_(mu[:, None]).square_()
    var = torch.einsum("nv,nv->n", p, x)
    return token_lp, mu, var.clamp_(min=0).sqrt_(), rank


def score_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
    vocab_stats: bool = False,
    chunk_size: int = VOCAB_CHUNK,
) -> list[TokenScores]:
    """Teacher-forced scores of each example's reference response, in input order; `TokenStats`
    (with mu and sigma of every scored position) when `vocab_stats` (see `score_batch`).

    An example longer than `max_length` tokens, or than the model's context (`context_of`) less
    one (the vLLM engine computes one token past the scored ones; both backends cut alike), is
    scored with its prompt cut from the left (the response whole when it fits) and is marked
    `truncated`; an empty response scores no token.

    `model` may be a vLLM handle (`overmem.vllm_backend.VllmModel`): the same token ids are then
    scored by the engine's prompt log-probs. vLLM has no vocabulary statistics: with `vocab_stats`
    the checkpoint is loaded with Hugging Face for this pass (and a note says so)."""
    context = context_of(model)
    max_length = max_length if context is None else min(max_length, context - 1)
    if is_vllm(model):
        if not vocab_stats:
            return _score_vllm(model, tokenizer, examples, batch_size=batch_size, max_length=max_length,
                               progress=progress)
        _note_once("vocabulary statistics (Min-K%++) come from the Hugging Face backend: vLLM does not compute them")
        model = model.hf_model()
    was_training = model.training
    model.eval()
    out: list[TokenScores | None] = [None] * len(examples)
    pad_id = pad_id_of(tokenizer)
    for idx, encoded in length_sorted_batches(tokenizer, examples, batch_size=batch_size, max_length=max_length):
        ids, labels = [e.ids for e in encoded], [e.labels for e in encoded]
        scores = score_batch(model, ids, labels, pad_id, vocab_stats=vocab_stats, chunk_size=chunk_size)
        for i, e, s in zip(idx, encoded, scores):
            s.truncated = e.truncated
            out[i] = s
        if progress:
            progress(len(idx))
    model.train(was_training)
    return out  # type: ignore[return-value]


def _score_vllm(model: VllmModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
                batch_size: int, max_length: int, progress: Callable[[int], None] | None) -> list[TokenScores]:
    """`score_examples` on the vLLM engine: the encodings of the Hugging Face path, the log-prob of
    each labelled token given the tokens before it."""
    out: list[TokenScores | None] = [None] * len(examples)
    # The engine batches by itself; bigger requests only make progress reports coarser.
    for idx, encoded in length_sorted_batches(tokenizer, examples, batch_size=max(batch_size, VLLM_REQUEST),
                                              max_length=max_length):
        starts = [next((t for t, y in enumerate(e.labels) if y != IGNORE), len(e.labels)) for e in encoded]
        logprobs = model.score([e.ids for e in encoded], starts)
        for i, e, lp in zip(idx, encoded, logprobs):
            out[i] = TokenScores(torch.tensor(lp, dtype=torch.float32), truncated=e.truncated)
        if progress:
            progress(len(idx))
    return out  # type: ignore[return-value]


_noted: set[str] = set()


def _note_once(text: str) -> None:
    if text not in _noted:
        _noted.add(text)
        print(f"note: {text}", file=sys.stderr)


def response_pieces(tokenizer: PreTrainedTokenizerBase, response: str, n_tokens: int) -> list[str]:
    """The text of each of the first `n_tokens` response tokens, as `encode_example` tokenizes
    the response: joined, the pieces give the scored part of `response` exactly.

    Fast tokenizers give character offsets; each piece runs from its token's start to the next
    token's start, so whitespace a tokenizer leaves out of every span goes with the token before
    it (and tokens that share one character, like byte pieces of one emoji, give "" but the last).
    Slow tokenizers are decoded prefix by prefix.
    """
    if n_tokens == 0:
        return []
    if tokenizer.is_fast:
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        starts = [0]
        for s, _ in enc["offset_mapping"][1:]:
            starts.append(max(starts[-1], s))  # offsets never run backwards
        ids = enc["input_ids"]
        ends = starts[1:n_tokens + 1] if n_tokens < len(ids) else starts[1:] + [len(response)]
        return [response[s:e] for s, e in zip(starts[:n_tokens], ends)]
    ids = tokenizer(response, add_special_tokens=False)["input_ids"][:n_tokens]
    prefixes = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    return [b[len(a):] if b.startswith(a) else b for a, b in zip(["", *prefixes], prefixes)]
