"""The evaluation backend interface: what scoring and generation ask of a checkpoint, on token ids.

A backend (`EvalBackend`) is one checkpoint as an engine evaluates it: `overmem.hf_backend.HfBackend`
(a Hugging Face model in this process) or `overmem.vllm_backend.VllmModel` (a handle on the
process's vLLM engine). `overmem.scoring` and `overmem.generation` tokenize, cut, batch and decide
where a continuation ends; a backend only scores, decodes and verifies the token ids it is given,
so both backends see and write the same tokens. `overmem.backends` opens the backend the run
config names (`load_for_eval`) and wraps a Hugging Face model passed as it is (`as_backend`).

What scoring returns (`TokenScores`), per scored token y_t of a reference response, with p the
model's next-token distribution there:

    l_t      = log p(y_t | x, y_<t)
    rank_t   = 1 + #{v : p(v) > p(y_t)}                 (1: y_t is the greedy choice; ties count for y_t)
    H_t      = -sum_v p(v) log p(v)                     (predictive entropy, nats)

and with the vocabulary statistics Min-K%++ needs (`TokenStats`, `overmem.analysis.mia`):

    mu_t     = sum_v p(v) log p(v)                      (= -H_t)
    sigma_t  = sqrt(sum_v p(v) (log p(v) - mu_t)^2)     (spread of log p under p)

rank_t and H_t are the cheap signals of the whole distribution ("Forecasting Downstream LLM
Performance With Token-Level Proxy Metrics", 2026, finds such signals on expert-written solutions
forecast accuracy better than cross-entropy); the vLLM engine returns l_t and rank_t, no H_t.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from .config import RunConfig


@dataclass
class TokenScores:
    """Scores of one reference response: `logprobs` has one entry per scored token. `truncated`:
    the example did not fit `max_length` and was cut (`overmem.data.encoding.fit_lengths`)."""

    logprobs: torch.Tensor  # (T,) float32, l_t
    truncated: bool = field(default=False, kw_only=True)
    ranks: torch.Tensor | None = field(default=None, kw_only=True)  # (T,) int64, rank_t; None: not computed
    entropy: torch.Tensor | None = field(default=None, kw_only=True)  # (T,) float32, H_t; None: not computed (vLLM)
    # (T + 1,) int64, greedy[j]: the greedy token after x, y_1 .. y_j (`score(greedy=True)`); None: not computed
    greedy: torch.Tensor | None = field(default=None, kw_only=True)

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

    mu: torch.Tensor  # (T,) float32, mu_t at each scored position
    sigma: torch.Tensor  # (T,) float32, sigma_t at each scored position


Progress = Callable[[int], None]


class EvalBackend(ABC):
    """One checkpoint as an evaluation backend runs it. Every method takes and returns token ids
    (or their scores), in the order given; none tokenizes or cuts, and where a continuation ends
    is the caller's `overmem.stops.StopRule` (a backend may stop early or run on past it)."""

    min_request: int = 1  # rows worth sending at once, at least (a bigger request only paces progress reports)
    verify_lookahead: int = 0  # positions a verification computes past prompt + draft, inside the context

    @classmethod
    @abstractmethod
    def open(cls, path: str | Path | None, cfg: RunConfig) -> EvalBackend:
        """The checkpoint at `path` (None: the base model, `cfg.model`) ready to evaluate."""

    @property
    @abstractmethod
    def context(self) -> int | None:
        """The longest sequence it takes (None: its config names none)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The number of token ids it scores and writes (rows of the output layer)."""

    @property
    @abstractmethod
    def drafts_exact(self) -> bool:
        """Whether its greedy token is the argmax of its logits, so that `verify` gives the tokens
        step-by-step greedy decoding writes."""

    @abstractmethod
    def score(self, ids: Sequence[list[int]], labels: Sequence[list[int]], *, pad_id: int,
              vocab_stats: bool = False, chunk_size: int | None = None, greedy: bool = False) -> list[TokenScores]:
        """Teacher-forced scores of each row's labelled tokens (`labels[i][t]` is `ids[i][t]`, or
        `overmem.data.encoding.IGNORE` where not scored: a response mask), each given the ids before
        it; `TokenStats` with `vocab_stats` (a backend that cannot refuses: see `with_vocab_stats`).
        With `greedy`, also the greedy token after each prefix of the row from its ids before the
        first labelled one to the whole row (`TokenScores.greedy`: what `verify` gives for prompt =
        the ids before the first labelled one, draft = the rest; None for a row with none labelled, or
        labelled from its first token on).
        `pad_id` pads rows where a backend pads; `chunk_size` bounds the rows of its vocabulary
        statistics' temporaries (None: its default)."""

    @abstractmethod
    def with_vocab_stats(self) -> EvalBackend:
        """A backend of the same checkpoint that computes the vocabulary statistics: this one, or
        the checkpoint loaded with Hugging Face."""

    @abstractmethod
    def verify(self, tokenizer: PreTrainedTokenizerBase, seqs: dict[int, tuple[list[int], list[int]]], *,
               batch_size: int) -> dict[int, list[int]]:
        """For each key's (prompt, draft): its greedy token after prompt + draft[:j], for j = 0 ..
        len(draft), from one teacher-forced pass over prompt + draft (or over the draft alone, after
        a prompt `score` computed within `keeping_prompts`)."""

    @contextmanager
    def keeping_prompts(self) -> Iterator[None]:
        """Within it, a backend may keep what `score(greedy=True)` computed for each row's prompt
        (its ids before the first labelled one) so that `verify` of a draft after the same prompt
        need not run the prompt again, and what `verify` computed so that `decode` need not run a
        prompt + accepted draft again; the tokens given are the same. Kept until the block ends.
        This one keeps nothing."""
        yield

    @abstractmethod
    def decode(self, tokenizer: PreTrainedTokenizerBase, inputs: Sequence[list[int]], limits: Sequence[int], *,
               answer_line: Sequence[bool], carried: Sequence[int] | None = None,
               expected: Sequence[int | None] | None = None, batch_size: int, cache: str = "auto",
               num_samples: int = 1, sampling: tuple[float, float] | None = None, seed: int = 0,
               progress: Progress | None = None) -> list[list[list[int]]]:
        """`num_samples` continuations (new token ids) of each of `inputs`, in input order: greedy,
        or sampled at (temperature, top_p), seeded so the same call gives the same tokens. Each
        stops at EOS or after `limits[i]` tokens; one whose `answer_line[i]` may also stop after its
        answer line (the last `carried[i]` tokens of input i already belong to it). A backend may
        run on past those stops (padding, or the text after the answer line): the caller cuts
        (`overmem.stops.StopRule`). `cache`: the Hugging Face KV cache (`generation.cache`).
        `expected[i]` (None: unknown): about how many new tokens input i's continuation takes (a
        draft's length), a hint a backend may size its work by; the tokens are the same without it."""
