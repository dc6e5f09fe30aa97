"""Batched decoding: left padding, length-sorted batches, per-sequence stopping.

A sequence stops at EOS, or (with `stop_at_answer`) once it has written a complete GSM8K
answer line `#### <answer>\\n`, so a model that rambles after answering costs nothing more.

A prompt longer than `max_prompt_tokens` (the run's `train.max_length`) keeps its last tokens, as
scoring cuts prompts (`overmem.data.encoding.fit_lengths`): a sequence is then never longer than
`max_prompt_tokens + max_new_tokens`, however long the question. A prompt that long cannot be
scored whole either, so scoring marks its example `truncated` (`overmem.scoring.score_examples`).
Nor is a sequence longer than the model's context (`context_of`: its config's
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
pass and the step-by-step decoding pick different tokens (as two batch sizes can). The vLLM
engine verifies with its prompt log-probs' top tokens and resumes decoding itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList

from .config import GenerationConfig, TrainConfig
from .data.encoding import pad_right, token_ids
from .models import context_length
from .stops import AnswerLineStop, RowLimit, StopRule, truncate_after_answer
from .vllm_backend import VLLM_REQUEST, VllmModel, is_vllm

DEFAULTS = GenerationConfig()  # decoding limits: their defaults live in the config, nowhere else
MAX_PROMPT_TOKENS = TrainConfig().max_length  # the longest prompt, by default
VERIFY_LOGITS = 2**27  # logits one verification pass holds at most (rows x positions x vocabulary): 512 MiB in float32


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
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

    Returns one list of texts per prompt, in input order. Sampling is seeded per batch, so
    the same call gives the same texts. `cache="static"` has transformers preallocate the KV
    cache for prompt + `max_new_tokens` instead of growing it every token (faster for small
    models on the CPU; the attention over the unused slots is masked, so outputs are the same);
    `cache="auto"` (the default) takes it on the CPU and the dynamic cache on GPUs.
    `model` may be a vLLM handle (`overmem.vllm_backend.VllmModel`; the cache setting is then moot).
    A prompt of more than `max_prompt_tokens` tokens keeps its last `max_prompt_tokens`.
    `stop_at_answer` (one value, or one per prompt): a continuation ends with its first complete
    `#### ...` line and is cut there; one that does not stop there is returned whole.
    """
    if cache not in ("dynamic", "static", "auto"):
        raise ValueError(f"generation.cache: {cache!r} is not 'auto', 'dynamic' or 'static'")
    stops = _per_prompt(stop_at_answer, len(prompts))
    encoded, limits = _budgets(model, tokenizer, prompts, max_prompt_tokens, max_new_tokens)
    if is_vllm(model):
        ids = _generate_vllm(model, tokenizer, encoded, limits, batch_size=batch_size,
                             sampling=(temperature, top_p) if do_sample else None, num_samples=num_samples,
                             seed=seed, progress=progress)
    else:
        with _evaluating(model):
            ids = _hf_decode(model, tokenizer, encoded, stops, limits=limits,
                             batch_size=batch_size, cache=cache, num_samples=num_samples,
                             sampling=(temperature, top_p) if do_sample else None, seed=seed, progress=progress)
    texts = [[tokenizer.decode(x, skip_special_tokens=True) for x in rows] for rows in ids]
    return [[truncate_after_answer(t) for t in mine] if cut else mine for mine, cut in zip(texts, stops)]


@dataclass
class Continuation:
    """A greedy continuation: its token ids (its stop included: EOS, the token that ends its answer
    line, or its `max_new_tokens`-th), its text (cut after the answer line where it stops there),
    and how much of it a draft gave: `draft_tokens` verified (None: no draft), of which the first
    `draft_accepted` are the model's own greedy tokens."""

    ids: list[int]
    text: str
    draft_tokens: int | None = None
    draft_accepted: int = 0


# generation_config fields whose logits processors make a greedy token other than the logits' argmax,
# with their neutral values; verifying a draft by argmax is exact only when all are neutral.
_PROCESSORS = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
               "min_length": (None, 0), "min_new_tokens": (None, 0), "suppress_tokens": (None,),
               "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
               "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
               "watermarking_config": (None,), "epsilon_cutoff": (None, 0.0)}


def drafts_are_exact(model: PreTrainedModel | VllmModel) -> bool:
    """Whether `generate_greedy` can verify drafts on `model` by the argmax of its logits: a vLLM
    handle (the engine decodes without the model's generation_config), or a Hugging Face model
    with no repetition penalty, minimum length, forced or forbidden tokens in its generation_config."""
    if is_vllm(model):
        return True
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, k, None) in neutral for k, neutral in _PROCESSORS.items())


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel | VllmModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    drafts: Sequence[Sequence[int] | None] | None = None,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    batch_size: int = DEFAULTS.batch_size,
    stop_at_answer: bool | Sequence[bool] = DEFAULTS.stop_at_answer,
    cache: str = DEFAULTS.cache,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> list[Continuation]:
    """The greedy continuation of each prompt (the texts `generate` gives), with its token ids.

    `drafts[i]` (token ids, e.g. the previous checkpoint's continuation of prompt i; None or empty:
    none) is verified in one teacher-forced pass (`verify_drafts`): its longest prefix that is the
    model's greedy choice is kept, followed by the model's own token there, and decoding resumes
    from there only if that has not reached the continuation's stop (`StopRule`). Drafts are
    ignored where verification would not be exact (`drafts_are_exact`)."""
    stops = _per_prompt(stop_at_answer, len(prompts))
    encoded, limits = _budgets(model, tokenizer, prompts, max_prompt_tokens, max_new_tokens)
    if drafts is not None and len(drafts) != len(prompts):
        raise ValueError(f"drafts: {len(drafts)} for {len(prompts)} prompts")
    rule = StopRule(tokenizer, max_new_tokens)
    vllm = is_vllm(model)
    with nullcontext() if vllm else _evaluating(model):
        vocab = model.vocab_size() if vllm else model.get_output_embeddings().weight.shape[0]
        # The engine computes one token past prompt + draft: a draft that fills the context loses its last token.
        context = context_of(model)
        room = [limits[i] - (vllm and len(encoded[i]) + limits[i] >= context) for i in range(len(encoded))]
        given = {i: list(d)[: room[i]] for i, d in enumerate(drafts or [])
                 if d and room[i] > 0 and all(0 <= t < (vocab or 0) for t in d)} if drafts_are_exact(model) else {}
        seqs = {i: (encoded[i], d) for i, d in given.items()}
        greedy = model.verify_drafts(seqs) if vllm else verify_drafts(model, seqs, pad_id=_pad_id(tokenizer),
                                                                      batch_size=batch_size)
        heads: dict[int, list[int]] = {}  # each continuation's tokens known before decoding
        accepted: dict[int, int] = {}
        for i, d in given.items():
            g = greedy[i]  # g[j]: the greedy token after prompt + d[:j]
            k = next((j for j in range(len(d)) if d[j] != g[j]), len(d))
            heads[i], accepted[i] = d[:k] + [g[k]], k
        out: dict[int, list[int]] = {}
        for i, head in heads.items():
            end = rule.end(head, stops[i], limits[i])
            if end is not None:
                out[i] = head[:end]
        if progress and out:
            progress(len(out))
        todo = [i for i in range(len(prompts)) if i not in out]
        inputs = [encoded[i] + heads.get(i, []) for i in todo]
        budgets = [limits[i] - len(heads.get(i, [])) for i in todo]
        if vllm:  # the engine decodes past the answer line; `_continuation` cuts there
            new = _generate_vllm(model, tokenizer, inputs, budgets, batch_size=batch_size, sampling=None,
                                 num_samples=1, seed=0, progress=progress)
        else:
            new = _hf_decode(model, tokenizer, inputs, [stops[i] for i in todo], limits=budgets,
                             carried=[len(heads.get(i, [])) for i in todo], batch_size=batch_size, cache=cache,
                             progress=progress)
        for i, (tail,) in zip(todo, new):
            out[i] = heads.get(i, []) + tail
    return [_continuation(rule, tokenizer, out[i], stops[i], limits[i], len(given[i]) if i in given else None,
                          accepted.get(i, 0)) for i in range(len(prompts))]


def _continuation(rule: StopRule, tokenizer: PreTrainedTokenizerBase, ids: list[int], answer_line: bool,
                  limit: int, draft_tokens: int | None = None, draft_accepted: int = 0) -> Continuation:
    """`ids` cut at the continuation's stop (decoding leaves padding after it), and its text."""
    end = rule.end(ids, answer_line, limit)
    ids = ids[:end] if end is not None else ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Continuation(ids, truncate_after_answer(text) if answer_line else text, draft_tokens, draft_accepted)


@torch.inference_mode()
def verify_drafts(model: PreTrainedModel, seqs: dict[int, tuple[list[int], list[int]]], *, pad_id: int,
                  batch_size: int) -> dict[int, list[int]]:
    """For each key's (prompt, draft): the model's greedy token after prompt + draft[:j], for j = 0
    .. len(draft), from one teacher-forced pass over prompt + draft (batched by length, right
    padding without a mask as `overmem.scoring.score_batch`: causal attention keeps every real
    token from the padding). Only the positions from the batch's shortest prompt on get logits,
    and a batch holds at most `VERIFY_LOGITS` of them."""
    out: dict[int, list[int]] = {}
    if not seqs:
        return out
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    order = sorted(seqs, key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    batches: list[list[int]] = []
    for i in order:  # longest first: a batch's first row sets its width
        last = batches[-1] if batches else []
        if last and len(last) < batch_size and (len(last) + 1) * sum(map(len, seqs[last[0]])) * vocab <= VERIFY_LOGITS:
            last.append(i)
        else:
            batches.append([i])
    for batch in batches:
        rows = [seqs[i][0] + seqs[i][1] for i in batch]
        width = max(map(len, rows))
        first = min(len(seqs[i][0]) for i in batch) - 1  # the first position whose logits are read
        logits = model(input_ids=pad_right(rows, pad_id).to(device), logits_to_keep=width - first).logits
        picks = logits.argmax(dim=-1).cpu()  # (B, width - first): greedy token after each position
        for r, i in enumerate(batch):
            prompt, draft = seqs[i]
            out[i] = picks[r, len(prompt) - 1 - first : len(prompt) + len(draft) - first].tolist()
    return out


def _per_prompt(stop_at_answer: bool | Sequence[bool], n: int) -> list[bool]:
    stops = [stop_at_answer] * n if isinstance(stop_at_answer, bool) else list(stop_at_answer)
    if len(stops) != n:
        raise ValueError(f"stop_at_answer: {len(stops)} values for {n} prompts")
    return stops


def context_of(model: PreTrainedModel | VllmModel) -> int | None:
    """The longest sequence `model` takes: the vLLM engine's `max_model_len`, or the context length
    of the Hugging Face model's config (`overmem.models.context_length`; None: it names none)."""
    if is_vllm(model):
        return model.engine.settings["max_model_len"]
    return context_length(model.config)


def _budgets(model: PreTrainedModel | VllmModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             max_prompt_tokens: int, max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt's token ids, cut to its last `max_prompt_tokens` (and context - 1) tokens, and
    its continuation's token limit: `max_new_tokens`, or fewer where the context ends first."""
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    context = context_of(model)
    keep = max_prompt_tokens if context is None else max(1, min(max_prompt_tokens, context - 1))
    encoded = [token_ids(tokenizer, p, add_special_tokens=True)[-keep:] for p in prompts]
    limits = [max_new_tokens if context is None else max(1, min(max_new_tokens, context - len(e))) for e in encoded]
    return encoded, limits


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class _evaluating:  # noqa: N801 - used as a context manager
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""

    def __init__(self, model: PreTrainedModel):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> PreTrainedModel:
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


@torch.inference_mode()
def _hf_decode(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, inputs: Sequence[list[int]], stops: Sequence[bool],
    *, limits: Sequence[int], carried: Sequence[int] | None = None, batch_size: int, cache: str, num_samples: int = 1,
    sampling: tuple[float, float] | None = None, seed: int = 0, progress: Callable[[int], None] | None = None,
) -> list[list[list[int]]]:
    """`num_samples` continuations (new token ids) of each of `inputs`, in input order, from
    `model.generate`: left padding, longest inputs first, each row stopped at EOS, at its answer line
    (`stops`; the last `carried[i]` tokens of input i already belong to its continuation) or after
    `limits[i]` new tokens. A row's ids run on to its batch's end (padding after its stop).
    Sampling (temperature, top_p) seeds batch b with `seed + b`."""
    if cache not in ("dynamic", "static", "auto"):
        raise ValueError(f"generation.cache: {cache!r} is not 'auto', 'dynamic' or 'static'")
    device = next(model.parameters()).device
    if cache == "auto":
        cache = "static" if device.type == "cpu" else "dynamic"
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    out: list[list[list[int]]] = [[] for _ in inputs]
    pad_id = _pad_id(tokenizer)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        width = max(len(inputs[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(inputs[i])) + inputs[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(inputs[i])) + [1] * len(inputs[i]) for i in idx], device=device)
        rows = [stops[i] for i in idx for _ in range(num_samples)]  # generate's rows: samples of a prompt together
        kept = None if carried is None else [carried[i] for i in idx for _ in range(num_samples)]
        criteria = StoppingCriteriaList([AnswerLineStop(tokenizer, width, rows, kept)] if any(rows) else [])
        budget = [limits[i] for i in idx for _ in range(num_samples)]
        if min(budget) < max(budget):
            criteria.append(RowLimit(width, budget))
        options = {"do_sample": True, "temperature": sampling[0], "top_p": sampling[1]} if sampling else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if sampling:
            torch.manual_seed(seed + b)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(budget),
            num_return_sequences=num_samples,
            stopping_criteria=criteria,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **({"cache_implementation": "static"} if cache == "static" else {}),
            **options,
        )
        new = gen[:, width:].tolist()
        for j, i in enumerate(idx):
            out[i] = new[j * num_samples : (j + 1) * num_samples]
        if progress:
            progress(len(idx))
    return out


def _generate_vllm(model: VllmModel, tokenizer: PreTrainedTokenizerBase, encoded: Sequence[list[int]],
                   limits: Sequence[int], *, batch_size: int, sampling: tuple[float, float] | None,
                   num_samples: int, seed: int, progress: Callable[[int], None] | None) -> list[list[list[int]]]:
    """The continuations' token ids from the vLLM engine: the same prompt token ids, EOS as the one
    stop token. A continuation runs on past its answer line (vLLM has no stop rule of ours); the
    caller cuts it as the Hugging Face path is cut. Sampling seeds prompt i with `seed + i`."""
    temperature, top_p = sampling if sampling else (0.0, 1.0)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[list[list[int]]] = []
    step = max(batch_size, VLLM_REQUEST)  # the engine batches by itself; this only paces progress reports
    for start in range(0, len(encoded), step):
        part = encoded[start : start + step]
        out.extend(model.generate_ids(part, max_tokens=list(limits[start : start + step]), n=num_samples,
                                      temperature=temperature,
                                      top_p=top_p, seed=seed + start, stop_token_ids=stop))
        if progress:
            progress(len(part))
    return out
