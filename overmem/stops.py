"""Where a continuation ends: after its first EOS, after the token that completes its first answer
line `#### <answer>\\n` (where it stops there: `generation.stop_at_answer`), or at its token limit.

`StopRule` applies the rule to given token ids (a draft, a vLLM continuation that ran on);
`AnswerLineStop` and `RowLimit` apply it step by step inside transformers' decoding;
`truncate_after_answer` cuts a text after its answer line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

ANSWER_LINE = re.compile(r"####[^\n]*\S[^\n]*\n")


def newline_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the tokens whose text holds a newline (the only tokens that can end an answer line)."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [i for i, t in enumerate(vocab) if t and ("\n" in t or "Ċ" in t or "<0x0A>" in t)]


def truncate_after_answer(text: str) -> str:
    m = ANSWER_LINE.search(text)
    return text[: m.end()].rstrip("\n") if m else text


class StopRule:
    """Where a continuation ends, on token ids: after its first EOS, after the token that completes
    its first answer line (where it stops there), or at its `max_new_tokens`-th token: the rule
    decoding applies step by step (EOS, `AnswerLineStop`, the token limit), applied to given tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos = tokenizer.eos_token_id
        self.newlines = frozenset(newline_ids(tokenizer))

    def end(self, ids: Sequence[int], answer_line: bool, limit: int | None = None) -> int | None:
        """The length of the continuation whose first tokens are `ids`; None if it goes on past them.
        `limit`: this continuation's own token limit, if below `max_new_tokens` (the context's end)."""
        limit = self.max_new_tokens if limit is None else min(limit, self.max_new_tokens)
        for j, token in enumerate(ids[:limit]):
            if token == self.eos or (answer_line and token in self.newlines and self.answered(ids[: j + 1])):
                return j + 1
        return limit if len(ids) >= limit else None

    def answered(self, ids: Sequence[int]) -> bool:
        return bool(ANSWER_LINE.search(self.tokenizer.decode(ids, skip_special_tokens=True)))


class AnswerLineStop(StoppingCriteria):
    """Marks a row finished once its new text holds a complete `#### ...` line.

    Only rows whose latest token contains a newline are decoded, which keeps the per-step
    cost to a handful of short decodes. `carried[r]`: how many of row r's last input tokens are
    already part of its continuation (decoding resumed after a draft's accepted prefix).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, rows: Sequence[bool] | None = None,
                 carried: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.rows = None if rows is None else torch.tensor(list(rows), dtype=torch.bool)  # rows that stop
        self.starts = None if carried is None else [prompt_width - c for c in carried]
        self.newline_ids = torch.tensor(newline_ids(tokenizer), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].cpu()
        hit = torch.isin(last, self.newline_ids)
        candidates = (hit if self.rows is None else hit & self.rows).nonzero().flatten().tolist()
        for row in candidates:
            start = self.prompt_width if self.starts is None else self.starts[row]
            text = self.tokenizer.decode(input_ids[row, start:], skip_special_tokens=True)
            done[row] = bool(ANSWER_LINE.search(text))
        return done


class RowLimit(StoppingCriteria):
    """Marks row r finished once it has `limits[r]` new tokens (rows of one batch with different budgets)."""

    def __init__(self, prompt_width: int, limits: Sequence[int]):
        self.prompt_width = prompt_width
        self.limits = torch.tensor(list(limits), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_width >= self.limits).to(input_ids.device)
