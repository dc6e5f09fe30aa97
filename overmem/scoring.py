"""The one teacher-forced forward pass: per-token log-probabilities of reference responses.

Every perplexity, and every analysis that needs token probabilities, reads from `score_batch`
so the numbers agree across the tool. Prompt and response are tokenized separately and
concatenated, so the response tokens scored are exactly the tokens trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data.example import Example, format_prompt

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


@dataclass
class TokenScores:
    """Scores of one reference response: `logprobs` has one entry per scored token."""

    logprobs: torch.Tensor  # (T,) float32, log p(y_t | x, y_<t)

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


def pad_right(seqs: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


@torch.inference_mode()
def score_batch(
    model: PreTrainedModel, batch_ids: Sequence[list[int]], batch_labels: Sequence[list[int]], pad_id: int
) -> list[TokenScores]:
    """One batched forward pass (right padding); log-probs of every labelled token.

    No attention mask is passed: with right padding, causal attention already keeps every
    real token from seeing the padding after it, and positions start at 0 in every row, so
    the scores are exact and the model takes its fastest (purely causal) attention path.
    """
    device = next(model.parameters()).device
    input_ids = pad_right(batch_ids, pad_id).to(device)  # (B, T)
    labels = pad_right(batch_labels, IGNORE).to(device)  # (B, T)
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    # Position t predicts token t+1: score only the labelled (response) positions.
    target = labels[:, 1:]
    keep = target != IGNORE  # (B, T-1)
    picked = logits[:, :-1][keep].float()  # (N, V), N = labelled tokens in the batch
    lp = -F.cross_entropy(picked, target[keep], reduction="none")  # (N,)
    counts = keep.sum(dim=1).tolist()
    return [TokenScores(chunk.cpu()) for chunk in lp.split(counts)]


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
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def score_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> list[TokenScores]:
    """Teacher-forced scores of each example's reference response, in input order."""
    was_training = model.training
    model.eval()
    out: list[TokenScores | None] = [None] * len(examples)
    pad_id = pad_id_of(tokenizer)
    for idx, ids, labels in length_sorted_batches(tokenizer, examples, batch_size=batch_size, max_length=max_length):
        for i, s in zip(idx, score_batch(model, ids, labels, pad_id)):
            out[i] = s
        if progress:
            progress(len(idx))
    model.train(was_training)
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
