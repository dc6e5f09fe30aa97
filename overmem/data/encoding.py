"""Examples as token ids: the one place that turns prompt + response into model inputs.

Training and scoring both encode here, so the response tokens scored are exactly the tokens
trained on: prompt and response are tokenized separately and concatenated, and the prompt
positions carry the label `IGNORE`. An example longer than `max_length` tokens is cut as
`fit_lengths` says (the response keeps priority; the prompt loses its start), and says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from .example import Example, format_prompt

IGNORE = -100
CACHED_TEXTS = 2**17  # texts whose token ids `token_ids` keeps per tokenizer (a run's tracked splits, many times over)

# tokenizer -> (vocabulary size, {(text, add_special_tokens): ids}); see `token_ids`.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool) -> list[int]:
    """`tokenizer(text)["input_ids"]`, remembered: tracking encodes the same prompts and references
    at every checkpoint, and a tokenizer is a pure function of its text (its vocabulary size is part
    of the key, so tokens added later start the cache afresh). Returns a new list each call."""
    try:
        size, known = _CACHE.get(tokenizer, (None, None))
    except TypeError:  # not weak-referenceable: no cache
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if size != len(tokenizer) or len(known) >= CACHED_TEXTS:
        known = {}
        _CACHE[tokenizer] = (len(tokenizer), known)
    key = (text, add_special_tokens)
    if key not in known:
        known[key] = tuple(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return list(known[key])


class Encoded(NamedTuple):
    """One example as model inputs."""

    ids: list[int]  # prompt + response token ids
    labels: list[int]  # the ids, with IGNORE at the prompt positions
    truncated: bool  # the example did not fit `max_length`: its prompt (and maybe response) was cut


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    *,
    max_length: int,
    add_eos: bool,
    template: str | None = None,
) -> Encoded:
    """Token ids of prompt+response and labels that mask the prompt with -100, cut to `max_length`
    tokens as `fit_lengths` says.

    Training appends EOS so the model learns to stop; scoring does not, so the perplexity
    is that of the reference text alone.
    """
    prompt = format_prompt(example.question) if template is None else format_prompt(example.question, template)
    p_ids = token_ids(tokenizer, prompt, add_special_tokens=True)
    r_ids = token_ids(tokenizer, example.response, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    n_prompt, n_response = fit_lengths(len(p_ids), len(r_ids), max_length)
    truncated = (n_prompt, n_response) != (len(p_ids), len(r_ids))
    p_ids, r_ids = p_ids[len(p_ids) - n_prompt :], r_ids[:n_response]
    return Encoded(p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids, truncated)


def fit_lengths(n_prompt: int, n_response: int, max_length: int) -> tuple[int, int]:
    """How many prompt tokens (the last ones) and response tokens (the first ones) an example of
    `n_prompt` + `n_response` tokens keeps in `max_length` tokens; all of them when they fit.

    The response is what is trained on and scored, so it keeps priority: the prompt loses tokens
    from its start (as lm-evaluation-harness cuts contexts) until the whole response fits after
    at least one prompt token (a position predicts the next token, so a response with nothing
    before it could not have its first token scored). A response too long even for that keeps
    its first `max_length - 1` tokens after the prompt's last token.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    kept_prompt = min(n_prompt, max(max_length - n_response, 1))
    return kept_prompt, min(n_response, max_length - kept_prompt)


def pad_right(seqs: Sequence[list[int]], value: int) -> torch.Tensor:
    """The sequences as one (B, T) long tensor, each padded on the right with `value`."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def length_sorted_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, batch_size: int, max_length: int
) -> Iterator[tuple[list[int], list[Encoded]]]:
    """Encoded examples (prompt masked, no EOS) in batches of similar length, so each batch
    carries little padding: yields (indices into `examples`, their encodings)."""
    encoded = [encode_example(tokenizer, ex, max_length=max_length, add_eos=False) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, [encoded[i] for i in idx]


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad inputs with: the tokenizer's pad token, else its EOS, else 0 (padding is never
    attended to or scored, so any id serves; `overmem.models.load_tokenizer` sets pad to EOS)."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    return 0
