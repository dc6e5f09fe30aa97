"""Batched decoding: left padding, length-sorted batches, per-sequence stopping.

A sequence stops at EOS, or (with `stop_at_answer`) once it has written a complete GSM8K
answer line `#### <answer>\\n`, so a model that rambles after answering costs nothing more.

A prompt longer than `max_prompt_tokens` (the run's `train.max_length`) keeps its last tokens, as
scoring cuts prompts (`overmem.data.encoding.fit_lengths`): a sequence is then never longer than
`max_prompt_tokens + max_new_tokens`, however long the question. A prompt that long cannot be
scored whole either, so scoring marks its example `truncated` (`overmem.scoring.score_examples`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from .config import GenerationConfig, TrainConfig
from .vllm_backend import VLLM_REQUEST, VllmModel, is_vllm

DEFAULTS = GenerationConfig()  # decoding limits: their defaults live in the config, nowhere else
MAX_PROMPT_TOKENS = TrainConfig().max_length  # the longest prompt, by default
_ANSWER_LINE = re.compile(r"####[^\n]*\S[^\n]*\n")


class AnswerLineStop(StoppingCriteria):
    """Marks a row finished once its new text holds a complete `#### ...` line.

    Only rows whose latest token contains a newline are decoded, which keeps the per-step
    cost to a handful of short decodes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int, rows: Sequence[bool] | None = None):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.rows = None if rows is None else torch.tensor(list(rows), dtype=torch.bool)  # rows that stop
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        newline_ids = [i for i, t in enumerate(vocab) if t and ("\n" in t or "Ċ" in t or "<0x0A>" in t)]
        self.newline_ids = torch.tensor(newline_ids, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].cpu()
        hit = torch.isin(last, self.newline_ids)
        candidates = (hit if self.rows is None else hit & self.rows).nonzero().flatten().tolist()
        for row in candidates:
            text = self.tokenizer.decode(input_ids[row, self.prompt_width :], skip_special_tokens=True)
            done[row] = bool(_ANSWER_LINE.search(text))
        return done


def truncate_after_answer(text: str) -> str:
    m = _ANSWER_LINE.search(text)
    return text[: m.end()].rstrip("\n") if m else text


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
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    stops = [stop_at_answer] * len(prompts) if isinstance(stop_at_answer, bool) else list(stop_at_answer)
    if len(stops) != len(prompts):
        raise ValueError(f"stop_at_answer: {len(stops)} values for {len(prompts)} prompts")
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_prompt_tokens:] for p in prompts]
    if is_vllm(model):
        return _generate_vllm(model, tokenizer, encoded, stops, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              sampling=(temperature, top_p) if do_sample else None, num_samples=num_samples,
                              seed=seed, progress=progress)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if cache == "auto":
        cache = "static" if device.type == "cpu" else "dynamic"
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[list[str]] = [[] for _ in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=device)
        rows = [stops[i] for i in idx for _ in range(num_samples)]  # generate's rows: samples of a prompt together
        criteria = StoppingCriteriaList([AnswerLineStop(tokenizer, width, rows)] if any(rows) else [])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if do_sample:
            torch.manual_seed(seed + b)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            stopping_criteria=criteria,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            **({"cache_implementation": "static"} if cache == "static" else {}),
            **sampling,
        )
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for j, i in enumerate(idx):
            mine = texts[j * num_samples : (j + 1) * num_samples]
            out[i] = [truncate_after_answer(t) for t in mine] if stops[i] else mine
        if progress:
            progress(len(idx))
    model.train(was_training)
    return out


def _generate_vllm(model: VllmModel, tokenizer: PreTrainedTokenizerBase, encoded: Sequence[list[int]],
                   stops: Sequence[bool], *, max_new_tokens: int, batch_size: int,
                   sampling: tuple[float, float] | None, num_samples: int, seed: int,
                   progress: Callable[[int], None] | None) -> list[list[str]]:
    """`generate` on the vLLM engine: the same prompt token ids, EOS as the one stop token, the
    continuations decoded here and cut after the answer line as the Hugging Face path cuts them.
    A continuation runs on past its answer line (vLLM has no stop rule of ours); the cut makes the
    text the same. Sampling seeds prompt i with `seed + i`."""
    temperature, top_p = sampling if sampling else (0.0, 1.0)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[list[str]] = []
    step = max(batch_size, VLLM_REQUEST)  # the engine batches by itself; this only paces progress reports
    for start in range(0, len(encoded), step):
        part = encoded[start : start + step]
        ids = model.generate_ids(part, max_tokens=max_new_tokens, n=num_samples, temperature=temperature,
                                 top_p=top_p, seed=seed + start, stop_token_ids=stop)
        for rows, cut in zip(ids, stops[start : start + step]):
            texts = [tokenizer.decode(x, skip_special_tokens=True) for x in rows]
            out.append([truncate_after_answer(t) for t in texts] if cut else texts)
        if progress:
            progress(len(part))
    return out
