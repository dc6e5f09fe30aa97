"""Teacher-forced scores of reference responses: the perplexity of every example, and the token
probabilities every analysis reads, come from `score_examples`, so the numbers agree across the tool.

Prompt and response are tokenized separately and concatenated (`overmem.data.encoding`), so the
response tokens scored are exactly the tokens trained on; the forward pass is the evaluation
backend's (`overmem.backend_api`: what each score is, `TokenScores` and `TokenStats`; the Hugging
Face pass in `overmem.hf_backend`, the vLLM engine's prompt log-probs of the same token ids in
`overmem.vllm_backend`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backend_api import EvalBackend, TokenScores, TokenStats
from .backends import as_backend
from .data.encoding import length_sorted_batches, pad_id_of
from .data.example import Example

__all__ = ["TokenScores", "TokenStats", "response_pieces", "score_batch", "score_examples"]


def score_batch(
    model: PreTrainedModel | EvalBackend,
    batch_ids: Sequence[list[int]],
    batch_labels: Sequence[list[int]],
    pad_id: int,
    *,
    vocab_stats: bool = False,
    chunk_size: int | None = None,
) -> list[TokenScores]:
    """One batch through `model`'s backend (`EvalBackend.score`): the log-prob of every labelled
    token (`overmem.data.encoding.IGNORE`: not scored), with `vocab_stats` also mu and sigma of
    each labelled position (`TokenStats`)."""
    return as_backend(model).score(batch_ids, batch_labels, pad_id=pad_id, vocab_stats=vocab_stats,
                                   chunk_size=chunk_size)


def score_examples(
    model: PreTrainedModel | EvalBackend,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
    vocab_stats: bool = False,
    chunk_size: int | None = None,
    greedy: bool = False,
) -> list[TokenScores]:
    """Teacher-forced scores of each example's reference response, in input order; `TokenStats`
    (with mu and sigma of every scored position) when `vocab_stats` (see `score_batch`); with
    `greedy`, also the model's greedy token after the prompt and after each reference token
    (`TokenScores.greedy`: the reference verified as a draft, `overmem.generation.generate_greedy`).

    An example longer than `max_length` tokens, or than the model's context less one (the vLLM
    engine computes one token past the scored ones; both backends cut alike), is scored with its
    prompt cut from the left (the response whole when it fits) and is marked `truncated`; an
    empty response scores no token.

    `model`: a Hugging Face model or an evaluation backend (`overmem.backends.load_for_eval`). vLLM
    has no vocabulary statistics: with `vocab_stats` the checkpoint is loaded with Hugging Face for
    this pass (`EvalBackend.with_vocab_stats`; a note says so)."""
    backend = as_backend(model)
    context = backend.context
    max_length = max_length if context is None else min(max_length, context - 1)
    if vocab_stats:
        backend = backend.with_vocab_stats()
    out: list[TokenScores | None] = [None] * len(examples)
    pad_id = pad_id_of(tokenizer)
    batches = length_sorted_batches(tokenizer, examples, batch_size=max(batch_size, backend.min_request),
                                    max_length=max_length)
    for idx, encoded in batches:
        scores = backend.score([e.ids for e in encoded], [e.labels for e in encoded], pad_id=pad_id,
                               vocab_stats=vocab_stats, chunk_size=chunk_size, greedy=greedy)
        for i, e, s in zip(idx, encoded, scores):
            s.truncated = e.truncated
            out[i] = s
        if progress:
            progress(len(idx))
    return out  # type: ignore[return-value]


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
