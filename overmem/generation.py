"""Greedy and sampled continuations of prompts, decoded by the evaluation backend
(`overmem.backend_api`; the Hugging Face one batches by length with left padding and stops each
sequence by itself).

A sequence stops at EOS, or (with `stop_at_answer`) once it has written a complete GSM8K
answer line `#### <answer>\\n` (`overmem.stops`), so a model that rambles after answering costs
nothing more.

A prompt longer than `max_prompt_tokens` (the run's `train.max_length`) keeps its last tokens, as
scoring cuts prompts (`overmem.data.encoding.fit_lengths`): a sequence is then never longer than
`max_prompt_tokens + max_new_tokens`, however long the question. A prompt that long cannot be
scored whole either, so scoring marks its example `truncated` (`overmem.scoring.score_examples`).
Nor is a sequence longer than the model's context (`EvalBackend.context`: its config's
`max_position_embeddings`, or the vLLM engine's `max_model_len`): a prompt keeps at most its last
context - 1 tokens, and a continuation ends where prompt + continuation fill the context. Both
backends cut so (`_budgets`), so they see and write the same tokens.

`generate_greedy` gives greedy continuations with their token ids, and takes drafts: the previous
checkpoint's continuations of the same prompts. One teacher-forced pass over prompt + draft gives
the model's greedy token at every draft position; the longest agreeing prefix is kept, the model's
own token follows it, and decoding resumes only where that has not yet reached the continuation's
stop (`StopRule`: EOS, the answer line, or `max_new_tokens`). A draft reproduced to its stop costs
one forward pass instead of one decoding step per token. The result is the model's own greedy
continuation whatever the draft; only where two top logits are equal to rounding can the batched
pass and the step-by-step decoding pick different tokens (as two batch sizes can). The backend
verifies (`EvalBackend.verify`; the vLLM engine by its prompt log-probs' top tokens) and decodes.
A draft some other pass already verified (`Verified`: the reference, whose greedy tokens scoring
computes anyway) costs no pass at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backend_api import EvalBackend
from .backends import as_backend
from .config import CACHES, GenerationConfig, TrainConfig
from .data.encoding import token_ids
from .stops import AnswerLineStop, StopRule, truncate_after_answer

__all__ = ["DEFAULTS", "AnswerLineStop", "Continuation", "StopRule", "Verified", "drafts_are_exact", "generate",
           "generate_greedy", "truncate_after_answer"]

DEFAULTS = GenerationConfig()  # decoding limits: their defaults live in the config, nowhere else
MAX_PROMPT_TOKENS = TrainConfig().max_length  # the longest prompt, by default


def generate(
    model: PreTrainedModel | EvalBackend,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    batch_size: int = DEFAULTS.batch_size,
    stop_at_answer: bool | Sequence[bool] = DEFAULTS.stop_at_answer,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    cache: str = DEFAULTS.cache,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """Generate `num_samples` continuations per prompt (greedy unless `do_sample`).

    Returns one list of texts per prompt, in input order. Sampling is seeded, so the same call
    gives the same texts. `model`: a Hugging Face model or an evaluation backend
    (`overmem.backends.load_for_eval`); `cache`: how the Hugging Face backend decodes
    (`generation.cache`, `HfBackend.decode`: `"auto"`, the default, is overmem's pruned greedy loop
    on the CPU and `generate` with the dynamic cache on GPUs; moot for vLLM).
    A prompt of more than `max_prompt_tokens` tokens keeps its last `max_prompt_tokens`.
    `stop_at_answer` (one value, or one per prompt): a continuation ends with its first complete
    `#### ...` line and is cut there; one that does not stop there is returned whole.
    """
    if cache not in CACHES:
        raise ValueError(f"generation.cache: {cache!r} is not one of {', '.join(map(repr, CACHES))}")
    stops = _per_prompt(stop_at_answer, len(prompts))
    backend = as_backend(model)
    encoded, limits = _budgets(backend, tokenizer, prompts, max_prompt_tokens, max_new_tokens)
    ids = backend.decode(tokenizer, encoded, limits, answer_line=stops, batch_size=batch_size, cache=cache,
                         num_samples=num_samples, sampling=(temperature, top_p) if do_sample else None, seed=seed,
                         progress=progress)
    texts = [[tokenizer.decode(x, skip_special_tokens=True) for x in rows] for rows in ids]
    return [[truncate_after_answer(t) for t in mine] if cut else mine for mine, cut in zip(texts, stops)]


@dataclass
class Continuation:
    """A greedy continuation: its token ids (its stop included: EOS, the token that ends its answer
    line, or its `max_new_tokens`-th), its text (cut after the answer line where it stops there),
    and how much of it a draft gave: `draft_tokens` verified (None: no draft), of which the first
    `draft_accepted` are the model's own greedy tokens (and in the continuation), and where that
    draft came from (`draft_source`: "previous", the `drafts` given, or "reference", the `verified`
    ones)."""

    ids: list[int]
    text: str
    draft_tokens: int | None = None
    draft_accepted: int = 0
    draft_source: str | None = None


def drafts_are_exact(model: PreTrainedModel | EvalBackend) -> bool:
    """Whether `generate_greedy` can verify drafts on `model` by the argmax of its logits
    (`EvalBackend.drafts_exact`: a vLLM handle, or a Hugging Face model with no repetition penalty,
    minimum length, forced or forbidden tokens in its generation_config)."""
    return as_backend(model).drafts_exact


def generate_greedy(
    model: PreTrainedModel | EvalBackend,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    drafts: Sequence[Sequence[int] | None] | None = None,
    verified: Sequence[Verified | None] | None = None,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    batch_size: int = DEFAULTS.batch_size,
    stop_at_answer: bool | Sequence[bool] = DEFAULTS.stop_at_answer,
    cache: str = DEFAULTS.cache,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> list[Continuation]:
    """The greedy continuation of each prompt (the texts `generate` gives), with its token ids.

    `drafts[i]` (token ids, e.g. the previous checkpoint's continuation of prompt i; None or empty:
    none) is verified in one teacher-forced pass (`EvalBackend.verify`): its longest prefix that is the
    model's greedy choice is kept, followed by the model's own token there, and decoding resumes
    from there only if that has not reached the continuation's stop (`StopRule`).

    `verified[i]` is a draft some other pass of the same model already verified: the reference
    response, whose greedy tokens the scoring pass gives (`Verified`). It is used as a draft that
    costs nothing, where its prompt is the one generation sees and it agrees on a first token (or
    the model stops at once): a continuation it carries to its stop needs no verification of
    `drafts[i]` and no decoding; otherwise the longer of the two accepted prefixes is kept (the
    verified draft's where they are as long). `drafts[i]` is verified only where it follows the
    model past the verified draft's agreeing prefix; one rejected while it still follows it is
    settled by that pass (`_decided_by`). Drafts are ignored where verification would not be
    exact (`drafts_are_exact`)."""
    stops = _per_prompt(stop_at_answer, len(prompts))
    backend = as_backend(model)
    encoded, limits = _budgets(backend, tokenizer, prompts, max_prompt_tokens, max_new_tokens)
    rule = StopRule(tokenizer, max_new_tokens)
    # i -> (the continuation's tokens known before decoding, draft tokens accepted, draft length, source)
    heads: dict[int, tuple[list[int], int, int, str]] = {}
    done: set[int] = set()  # continuations a reference carries to their stop: no draft verified for them
    references = _verified(backend, encoded, limits, verified)
    for i, (d, g) in references.items():
        head, k = _accepted(d, g)
        stopped = rule.end(head, stops[i], limits[i]) is not None
        if k or stopped:  # a reference that gave no token is no draft
            heads[i] = (head, k, len(d), "reference")
            if stopped:
                done.add(i)
    given = {i: d for i, d in _drafts(backend, encoded, limits, drafts).items() if i not in done}
    # A draft rejected on the path the scoring pass already ran needs no pass of its own.
    decided = {i: a for i, d in given.items() if i in references
               and (a := _decided_by(d, *references[i])) is not None}
    greedy = backend.verify(tokenizer, {i: (encoded[i], d) for i, d in given.items() if i not in decided},
                            batch_size=batch_size)
    for i, d in given.items():
        head, k = decided[i] if i in decided else _accepted(d, greedy[i])
        if i not in heads or len(head) >= len(heads[i][0]):  # as long as the reference's: the previous draft counts
            heads[i] = (head, k, len(d), "previous")
    out: dict[int, list[int]] = {}
    for i, (head, *_) in heads.items():
        end = rule.end(head, stops[i], limits[i])
        if end is not None:
            out[i] = head[:end]
    if progress and out:
        progress(len(out))
    todo = [i for i in range(len(prompts)) if i not in out]
    known = {i: heads[i][0] if i in heads else [] for i in todo}
    # The previous checkpoint's continuation is about as long as this one's.
    new = backend.decode(tokenizer, [encoded[i] + known[i] for i in todo], [limits[i] - len(known[i]) for i in todo],
                         answer_line=[stops[i] for i in todo], carried=[len(known[i]) for i in todo],
                         expected=[max(len(given[i]) - len(known[i]), 1) if i in given else None for i in todo],
                         batch_size=batch_size, cache=cache, progress=progress)
    for i, (tail,) in zip(todo, new):  # a backend that runs past the answer line is cut by `_continuation`
        out[i] = known[i] + tail
    return [_continuation(rule, tokenizer, out[i], stops[i], limits[i], *heads[i][1:] if i in heads else ())
            for i in range(len(prompts))]


class Verified(NamedTuple):
    """A draft verified by another pass of the model: the `prompt` ids that pass saw, the `draft`
    after them, and `greedy[j]`, the model's greedy token after prompt + draft[:j] (j = 0 ..
    len(draft)), as `EvalBackend.verify` gives it."""

    prompt: list[int]
    draft: list[int]
    greedy: list[int]


def _accepted(draft: list[int], greedy: list[int]) -> tuple[list[int], int]:
    """The draft's longest prefix that is the model's greedy choice, followed by the model's own
    token there (`greedy[j]`: its token after prompt + draft[:j]), and that prefix's length."""
    k = next((j for j in range(len(draft)) if draft[j] != greedy[j]), len(draft))
    return draft[:k] + [greedy[k]], k


def _decided_by(draft: list[int], reference: list[int], greedy: list[int]) -> tuple[list[int], int] | None:
    """What verifying `draft` would give (`_accepted`), where a verified `reference` (`greedy[j]`:
    the model's token after prompt + reference[:j]) already shows it: the draft is rejected, or
    ends, while it still follows the reference. None where it follows the model past the reference."""
    for j in range(len(greedy)):
        if j == len(draft) or draft[j] != greedy[j]:
            return draft[:j] + [greedy[j]], j
        if j == len(reference) or draft[j] != reference[j]:
            return None
    return None


def _verified(backend: EvalBackend, encoded: Sequence[list[int]], limits: Sequence[int],
              verified: Sequence[Verified | None] | None) -> dict[int, tuple[list[int], list[int]]]:
    """The verified drafts used: index -> (draft cut to the continuation's limit, its greedy
    tokens), where the pass saw the prompt generation sees and verifying by argmax is exact."""
    if verified is not None and len(verified) != len(encoded):
        raise ValueError(f"verified: {len(verified)} for {len(encoded)} prompts")
    if not verified or not backend.drafts_exact:
        return {}
    return {i: (list(v.draft[: limits[i]]), list(v.greedy)) for i, v in enumerate(verified)
            if v is not None and list(v.prompt) == encoded[i] and len(v.greedy) == len(v.draft) + 1}


def _drafts(backend: EvalBackend, encoded: Sequence[list[int]], limits: Sequence[int],
            drafts: Sequence[Sequence[int] | None] | None) -> dict[int, list[int]]:
    """The drafts verified: index -> draft cut to where its verification fits (the vLLM engine
    computes one token past prompt + draft), none with a token outside the vocabulary, none
    where verifying by argmax is not exact (`drafts_are_exact`)."""
    if drafts is not None and len(drafts) != len(encoded):
        raise ValueError(f"drafts: {len(drafts)} for {len(encoded)} prompts")
    if not drafts or not backend.drafts_exact:
        return {}
    vocab, context = backend.vocab_size, backend.context
    room = [limits[i] if context is None else min(limits[i], context - len(encoded[i]) - backend.verify_lookahead)
            for i in range(len(encoded))]
    return {i: list(d)[: room[i]] for i, d in enumerate(drafts)
            if d and room[i] > 0 and all(0 <= t < vocab for t in d)}


def _continuation(rule: StopRule, tokenizer: PreTrainedTokenizerBase, ids: list[int], answer_line: bool,
                  limit: int, draft_accepted: int = 0, draft_tokens: int | None = None,
                  draft_source: str | None = None) -> Continuation:
    """`ids` cut at the continuation's stop (decoding leaves padding after it), and its text."""
    end = rule.end(ids, answer_line, limit)
    ids = ids[:end] if end is not None else ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Continuation(ids, truncate_after_answer(text) if answer_line else text, draft_tokens,
                        min(draft_accepted, len(ids)), draft_source)  # a reference may run on past the stop


def _per_prompt(stop_at_answer: bool | Sequence[bool], n: int) -> list[bool]:
    stops = [stop_at_answer] * n if isinstance(stop_at_answer, bool) else list(stop_at_answer)
    if len(stops) != n:
        raise ValueError(f"stop_at_answer: {len(stops)} values for {n} prompts")
    return stops


def _budgets(backend: EvalBackend, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             max_prompt_tokens: int, max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt's token ids, cut to its last `max_prompt_tokens` (and context - 1) tokens, and
    its continuation's token limit: `max_new_tokens`, or fewer where the context ends first."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    context = backend.context
    keep = max_prompt_tokens if context is None else max(1, min(max_prompt_tokens, context - 1))
    encoded = [token_ids(tokenizer, p, add_special_tokens=True)[-keep:] for p in prompts]
    limits = [max_new_tokens if context is None else max(1, min(max_new_tokens, context - len(e))) for e in encoded]
    return encoded, limits
