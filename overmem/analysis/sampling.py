"""Generations with their checked answers and model probabilities: what the sampling analyses share.

`sample_answers` decodes `n_samples` responses per query (greedy when `temperature` is None,
else seeded sampling through `overmem.generation.generate`), checks each with
`overmem.data.code.check_answers` (the final answer by `overmem.data.answers.is_correct`; code:
runs it against its tests in the sandbox), and scores each response teacher-forced under the
same model with `overmem.scoring.score_examples` (prompt = the paper's template, response = the
decoded text). That pass gives the token log-probs behind calibration confidence (`sequence_confidence`,
the mean token probability)
and the offline Best-of-N score (mean token log-prob). The probabilities are the model's own
(temperature 1), whatever temperature the samples were drawn at. Re-scoring the decoded text
rather than keeping generate()'s scores means the response is tokenized exactly as training and
perplexity tokenize it, and the text cut after the `#### answer` line is what gets scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import GenerationConfig, TrainConfig
from ..data.code import check_answers
from ..data.example import Example, format_prompt
from ..intervals import accuracy_interval

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DEFAULTS = GenerationConfig()  # the run config's decoding limits
_MAX_LENGTH = TrainConfig().max_length  # and its longest sequence


@dataclass(frozen=True)
class Decoding:
    """How to decode: greedy when `temperature` is None; `batch_size` prompts per generate call;
    a prompt keeps at most its last `max_prompt_tokens` tokens (the run's `train.max_length`).
    The limits are a run config's `generation` section (`from_config`), by default its defaults."""

    max_new_tokens: int = _DEFAULTS.max_new_tokens
    batch_size: int = _DEFAULTS.batch_size
    temperature: float | None = None
    top_p: float = 1.0
    n_samples: int = 1
    seed: int = 0
    stop_at_answer: bool = _DEFAULTS.stop_at_answer
    cache: str = _DEFAULTS.cache
    max_prompt_tokens: int = _MAX_LENGTH

    def __post_init__(self) -> None:
        if self.temperature is None and self.n_samples != 1:
            raise ValueError("greedy decoding gives one response per query; set a temperature to sample more")

    @classmethod
    def from_config(cls, generation: GenerationConfig, *, max_prompt_tokens: int, seed: int,
                    temperature: float | None = None, top_p: float = 1.0, n_samples: int = 1) -> Decoding:
        """The decoding of a run: its `generation` section's limits, prompts cut to
        `max_prompt_tokens` (its `train.max_length`), greedy unless a `temperature` is given."""
        return cls(max_new_tokens=generation.max_new_tokens, batch_size=generation.batch_size,
                   temperature=temperature, top_p=top_p, n_samples=n_samples, seed=seed,
                   stop_at_answer=generation.stop_at_answer, cache=generation.cache,
                   max_prompt_tokens=max_prompt_tokens)


def decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    decoding: Decoding,
    progress: Callable[[int], None] | None = None,
    examples: Sequence[Example] | None = None,
) -> list[list[str]]:
    """`decoding.n_samples` responses per prompt, in input order. With the prompts' `examples`,
    only those with an answer line stop at it (`Example.has_answer_line`)."""
    from ..generation import generate

    sampling = decoding.temperature is not None
    stops = decoding.stop_at_answer if examples is None else [
        decoding.stop_at_answer and ex.has_answer_line for ex in examples]
    return generate(
        model, tokenizer, prompts, max_new_tokens=decoding.max_new_tokens, batch_size=decoding.batch_size,
        stop_at_answer=stops, do_sample=sampling,
        temperature=decoding.temperature if sampling else 1.0, top_p=decoding.top_p,
        num_samples=decoding.n_samples, seed=decoding.seed, cache=decoding.cache,
        max_prompt_tokens=decoding.max_prompt_tokens, progress=progress,
    )


def check(examples: Sequence[Example], texts: Sequence[Sequence[str]]) -> list[list[dict[str, Any]]]:
    """Per query, per response: {"text", "extracted", "correct"}; code responses are run against
    their example's tests in the sandbox (all of them in parallel) and add the `failure` reason."""
    flat = [(ex, text) for ex, responses in zip(examples, texts) for text in responses]
    checks = iter(check_answers([ex for ex, _ in flat], [text for _, text in flat]))
    out: list[list[dict[str, Any]]] = []
    for responses in texts:
        rows = []
        for text in responses:
            check = next(checks)
            row = {"text": text, "extracted": check.extracted, "correct": bool(check.correct)}
            if check.code is not None:
                row["failure"] = check.code.failure
            rows.append(row)
        out.append(rows)
    return out


def sequence_confidence(token_logprobs: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Confidence of one generation: mean token probability (1/T) sum_t exp(l_t); NaN if T = 0."""
    import torch

    if isinstance(token_logprobs, torch.Tensor):
        token_logprobs = token_logprobs.detach().cpu().double().numpy()
    lp = np.asarray(token_logprobs, dtype=np.float64)
    return float(np.exp(lp).mean()) if lp.size else float("nan")


def response_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    texts: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
) -> list[list[np.ndarray]]:
    """Token log-probs (T,) of each response under `model`, teacher-forced after the query's prompt."""
    from ..scoring import score_examples

    flat = [Example(f"{ex.id}#{j}", ex.question, text, ex.answer, ex.kind)
            for ex, responses in zip(examples, texts) for j, text in enumerate(responses)]
    scores = iter(score_examples(model, tokenizer, flat, batch_size=batch_size, max_length=max_length))
    return [[next(scores).logprobs.double().numpy() for _ in responses] for responses in texts]


def sample_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    decoding: Decoding,
    *,
    score_batch_size: int = 16,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> list[list[dict[str, Any]]]:
    """Decode, check and score: per query, per response {"text", "extracted", "correct",
    "n_tokens", "mean_logprob", "confidence"}. An empty response has NaN mean_logprob and confidence."""
    texts = decode(model, tokenizer, [format_prompt(ex.question) for ex in examples], decoding, progress, examples)
    checked = check(examples, texts)
    logprobs = response_logprobs(model, tokenizer, examples, texts, batch_size=score_batch_size, max_length=max_length)
    for rows, lps in zip(checked, logprobs):
        for row, lp in zip(rows, lps):
            empty = lp.size == 0
            row.update(n_tokens=int(lp.size),
                       mean_logprob=float("nan") if empty else float(lp.mean()),
                       confidence=sequence_confidence(lp))
    return checked


def accuracy_ci(correct: Sequence[bool], *, n_boot: int, confidence: float, seed: int) -> dict[str, float]:
    """{"accuracy", "ci_low", "ci_high", "n"}: mean and percentile-bootstrap interval
    (`overmem.intervals.accuracy_interval`)."""
    values = [float(c) for c in correct]
    accuracy, low, high = accuracy_interval(values, n_boot=n_boot, confidence=confidence, seed=seed)
    return {"accuracy": accuracy, "ci_low": low, "ci_high": high, "n": len(values)}
