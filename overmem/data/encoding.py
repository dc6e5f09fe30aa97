"""Examples as token ids: the one place that turns prompt + response into model inputs.

Training and scoring both encode here, so the response tokens scored are exactly the tokens
trained on: prompt and response are tokenized separately and concatenated, and the prompt
positions carry the label `IGNORE`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .example import Example, format_prompt

IGNORE = -100


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    *,
    max_length: int,
    add_eos: bool,
    template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of prompt+response and labels that mask the prompt with -100.

    Training appends EOS so the model learns to stop; scoring does not, so the perplexity
    is that of the reference text alone. Over-long pairs lose the end of the response.
    """
    prompt = format_prompt(example.question) if template is None else format_prompt(example.question, template)
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:max_length]
    return ids, labels


def pad_right(seqs: Sequence[list[int]], value: int) -> torch.Tensor:
    """The sequences as one (B, T) long tensor, each padded on the right with `value`."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def length_sorted_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, batch_size: int, max_length: int
) -> Iterator[tuple[list[int], list[list[int]], list[list[int]]]]:
    """Encoded examples (prompt masked, no EOS) in batches of similar length, so each batch
    carries little padding: yields (indices into `examples`, input ids, labels)."""
    encoded = [encode_example(tokenizer, ex, max_length=max_length, add_eos=False) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, [encoded[i][0] for i in idx], [encoded[i][1] for i in idx]


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad inputs with: the tokenizer's pad token, or 0 when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
