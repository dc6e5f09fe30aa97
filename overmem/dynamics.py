"""Per-checkpoint, per-split learning dynamics: perplexity of references and accuracy.

Two perplexities are kept and named apart:
- `ppl`: mean over examples of each example's perplexity (what the paper's figures show);
- `ppl_token`: exp(total NLL / total tokens), the token-weighted version.
Accuracy comes with a percentile-bootstrap confidence interval over examples.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backend_api import EvalBackend
from .backends import as_backend
from .config import EvalConfig, GenerationConfig, RunConfig
from .data.code import can_check, check_answers
from .data.encoding import token_ids
from .data.example import Example, format_prompt
from .data.splits import TRAIN, VALIDATION
from .distributed import evaluate_sharded, is_main, main_value, on_main
from .generation import Verified, drafts_are_exact, generate_greedy
from .intervals import accuracy_interval
from .results import RunDir, append_jsonl, read_jsonl, write_jsonl
from .scoring import TokenScores, response_pieces, score_examples

TOKEN_DECIMALS = 4  # per-token NLL stored in samples files: enough to shade, small on disk


def split_summary(samples: Sequence[Mapping[str, Any]], eval_cfg: EvalConfig) -> dict[str, Any]:
    """Aggregate per-example rows into the split's figures.

    A perplexity that is not a finite number is None (NaN is no JSON value); when examples have a
    non-finite loss (a diverged model) the row counts them in `non_finite`, and its perplexities are
    None rather than a mean over the other examples. Examples cut to fit `max_length` are counted in
    `n_truncated`; examples with no scored token (an empty reference) have no perplexity, so `ppl`
    is the mean over the other `n - n_skipped`. Open-ended examples (kind "open") have no automatic
    check: accuracy is over the other examples (`n_unchecked` counts those left out when some are
    checked) and None (null in JSON, never NaN or 0) when no example is. Each count is there only
    when it is not zero."""
    ppls = [s["ppl"] for s in samples if s["n_tokens"]]
    nll = sum(s["nll_sum"] for s in samples)
    tokens = sum(s["n_tokens"] for s in samples)
    row: dict[str, Any] = {
        "n": len(samples),
        "ppl": float(np.mean(ppls)) if ppls else float("nan"),
        "ppl_token": math.exp(nll / tokens) if tokens else float("nan"),
        "nll_token": nll / tokens if tokens else float("nan"),
        "n_tokens": tokens,
        "accuracy": None,
        "accuracy_ci_low": None,
        "accuracy_ci_high": None,
    }
    correct = [float(s["correct"]) for s in samples if "correct" in s]  # open-ended examples have none
    if correct:
        accuracy, low, high = accuracy_interval(correct, n_boot=eval_cfg.bootstrap, confidence=eval_cfg.confidence)
        row.update(accuracy=accuracy, accuracy_ci_low=low, accuracy_ci_high=high)
    counts = {"non_finite": sum(not math.isfinite(p) for p in ppls),
              "n_truncated": sum(s["truncated"] for s in samples), "n_skipped": len(samples) - len(ppls),
              "n_unchecked": len(samples) - len(correct) if correct else 0}
    row.update((key, count) for key, count in counts.items() if count)
    for key in ("ppl", "ppl_token", "nll_token"):
        if not math.isfinite(row[key]):
            row[key] = None
    # Token-weighted means of each cheap signal over the examples that have it (all, or none: the
    # vLLM engine gives no entropy).
    for key, name in SIGNALS.items():
        signed = [s for s in samples if name in s and s["n_tokens"]]
        if signed:
            value = sum(s[name] * s["n_tokens"] for s in signed) / sum(s["n_tokens"] for s in signed)
            row[key] = value if math.isfinite(value) else None
    return row


# dynamics.jsonl key -> samples key of the cheap signals (`token_signals`).
SIGNALS = {"top1_token": "top1", "rank_token": "mean_rank", "entropy_token": "entropy"}


def token_signals(scores: TokenScores) -> dict[str, float]:
    """One example's cheap signals (`overmem.backend_api`): the share of its reference tokens that are
    the greedy choice (`top1`), their mean rank (`mean_rank`) and the mean predictive entropy at
    their positions (`entropy`, nats). Each is absent where not computed (the vLLM engine gives
    ranks but no entropy) or when no token was scored."""
    if not scores.n_tokens:
        return {}
    out = {}
    if scores.ranks is not None:
        out.update(top1=float((scores.ranks == 1).float().mean()), mean_rank=float(scores.ranks.float().mean()))
    if scores.entropy is not None:
        out["entropy"] = float(scores.entropy.mean())
    return out


@functools.lru_cache(maxsize=2**16)
def _pieces(tokenizer: PreTrainedTokenizerBase, response: str, n_tokens: int) -> tuple[str, ...]:
    """`response_pieces`, worked out once per tokenizer and response: every checkpoint of a run
    scores the same references."""
    return tuple(response_pieces(tokenizer, response, n_tokens))


def evaluate_examples(
    model: PreTrainedModel | EvalBackend,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    eval_cfg: EvalConfig,
    gen_cfg: GenerationConfig,
    max_length: int,
    desc: str = "",
    quiet: bool = False,
    token_losses: bool = False,
    drafts: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """Per-example rows: reference NLL, token count, perplexity (None when no token was scored),
    whether the example was cut to fit `max_length` (`truncated`; generation then sees the prompt's
    last `max_length` tokens too), and (if enabled) the greedy generation, the answer extracted
    from it and whether it is correct (code: the program, whether its tests passed in the sandbox,
    the `failure` reason and the `sandbox` isolation; `overmem.data.code`).

    With `token_losses`, rows also hold the question, the text of each scored response token
    (`tokens`) and its NLL (`token_nll`, rounded to TOKEN_DECIMALS): the report's token view.
    They come from the same forward pass, so they cost only the file space.

    The generation's token ids are kept (`generation_ids`): the next checkpoint's drafts. `drafts`
    (example id -> token ids, the previous checkpoint's `generation_ids`) are verified instead of
    decoded where they agree (`overmem.generation.generate_greedy`); with `gen_cfg.reuse_drafts`,
    each reference is a draft too, verified by the scoring pass (where scoring did not cut the
    example). Rows with a draft record its length (`draft_tokens`: a reference's up to the
    generation's token limit), how many of its tokens were the model's own and in the generation
    (`draft_accepted`), and which draft it was (`draft_source`: "previous" or "reference")."""
    checked = [i for i, ex in enumerate(examples) if ex.kind != "open" and can_check(ex)]
    backend = as_backend(model)
    # The scoring pass also gives the model's greedy tokens along each reference: a draft verified for
    # free; and it runs each prompt, which the previous checkpoint's drafts are verified after and
    # decoding resumes from.
    references = bool(eval_cfg.accuracy and checked and gen_cfg.reuse_drafts and drafts_are_exact(backend))
    with backend.keeping_prompts() if references else nullcontext():
        return _evaluate_examples(backend, tokenizer, examples, checked, references, eval_cfg=eval_cfg,
                                  gen_cfg=gen_cfg, max_length=max_length, desc=desc, quiet=quiet,
                                  token_losses=token_losses, drafts=drafts)


def _evaluate_examples(
    model: EvalBackend, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], checked: list[int],
    references: bool, *, eval_cfg: EvalConfig, gen_cfg: GenerationConfig, max_length: int, desc: str, quiet: bool,
    token_losses: bool, drafts: Mapping[str, Sequence[int]] | None,
) -> list[dict[str, Any]]:
    with tqdm(total=len(examples), desc=f"score {desc}", disable=quiet, leave=False) as bar:
        scores = score_examples(
            model, tokenizer, examples, batch_size=eval_cfg.batch_size, max_length=max_length, progress=bar.update,
            greedy=references,
        )
    rows = [
        {"id": ex.id, "nll_sum": s.nll_sum, "n_tokens": s.n_tokens, "ppl": s.ppl if s.n_tokens else None,
         "truncated": s.truncated, "answer": ex.answer, **token_signals(s)}
        for ex, s in zip(examples, scores)
    ]
    if token_losses:
        for row, ex, s in zip(rows, examples, scores):
            row.update(
                question=ex.question, tokens=list(_pieces(tokenizer, ex.response, s.n_tokens)),
                token_nll=[round(-x, TOKEN_DECIMALS) for x in s.logprobs.tolist()],
            )
    # Open-ended answers ("open") and code without tests (a CodeFeedback training set) have no
    # automatic check: no generation, no `correct` field.
    if eval_cfg.accuracy and checked:
        with tqdm(total=len(checked), desc=f"generate {desc}", disable=quiet, leave=False) as bar:
            outs = generate_greedy(
                model,
                tokenizer,
                [format_prompt(examples[i].question) for i in checked],
                drafts=[drafts.get(examples[i].id) for i in checked] if drafts else None,
                verified=[_reference_draft(tokenizer, examples[i], scores[i]) for i in checked] if references else None,
                max_new_tokens=gen_cfg.max_new_tokens,
                batch_size=gen_cfg.batch_size,
                stop_at_answer=[gen_cfg.stop_at_answer and examples[i].has_answer_line for i in checked],
                cache=gen_cfg.cache,
                max_prompt_tokens=max_length,
                progress=bar.update,
            )
        texts = [out.text for out in outs]
        for i, out in zip(checked, outs):
            rows[i]["generation_ids"] = out.ids
            if out.draft_tokens is not None:
                rows[i].update(draft_tokens=out.draft_tokens, draft_accepted=out.draft_accepted,
                               draft_source=out.draft_source)
        # Code is correct when its tests pass, run in parallel sandboxes.
        for i, text, check in zip(checked, texts, check_answers([examples[i] for i in checked], texts)):
            row = rows[i]
            row.update(generation=text, extracted=check.extracted, correct=check.correct)
            if check.code is not None:
                row.update(failure=check.code.failure, sandbox=check.code.sandbox)
    return rows


def _reference_draft(tokenizer: PreTrainedTokenizerBase, example: Example, scores: TokenScores) -> Verified | None:
    """The example's reference as a draft its scoring pass verified (None: scored cut, or without
    greedy tokens): the prompt and response token ids `overmem.data.encoding.encode_example` scored."""
    if scores.greedy is None or scores.truncated:
        return None
    prompt = token_ids(tokenizer, format_prompt(example.question), add_special_tokens=True)
    response = token_ids(tokenizer, example.response, add_special_tokens=False)
    return Verified(prompt, response, scores.greedy.tolist()) if len(response) + 1 == len(scores.greedy) else None


def previous_generations(run: RunDir, split: str, checkpoint: str) -> dict[str, list[int]]:
    """The greedy generations' token ids (example id -> ids) of the checkpoint evaluated last on
    `split` before `checkpoint`: the drafts `evaluate_examples` verifies. Empty when there is none
    (or its samples file cannot be read: a draft only saves time, it never changes a result)."""
    before = [r["checkpoint"] for r in run.read_dynamics() if r["split"] == split and r["checkpoint"] != checkpoint]
    if not before:
        return {}
    try:
        rows = read_jsonl(run.samples(before[-1], split), torn_ok=True)
    except (OSError, ValueError):
        return {}
    return {r["id"]: r["generation_ids"] for r in rows if isinstance(r.get("generation_ids"), list)}


def draft_totals(samples: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Draft tokens verified over a split and how many were accepted (absent without drafts), and
    how many generations had their reference as draft (`reference_drafts`, when any did)."""
    drafted = [s for s in samples if "draft_tokens" in s]
    if not drafted:
        return {}
    out = {"draft_tokens": sum(s["draft_tokens"] for s in drafted),
           "draft_accepted": sum(s["draft_accepted"] for s in drafted)}
    references = sum(s.get("draft_source") == "reference" for s in drafted)
    return {**out, "reference_drafts": references} if references else out


def eval_kwargs(cfg: RunConfig, tracked: Mapping[str, Any]) -> dict[str, Any]:
    """`evaluate_checkpoint`'s settings from a run config; test splits keep per-token losses for the
    report's token view."""
    tests = [s for s in tracked if s not in (TRAIN, VALIDATION)]
    return dict(eval_cfg=cfg.eval, gen_cfg=cfg.generation, max_length=cfg.train.max_length, quiet=cfg.quiet,
                token_splits=tests)


def evaluate_checkpoint(
    model: PreTrainedModel | EvalBackend,
    tokenizer: PreTrainedTokenizerBase,
    splits: Mapping[str, Sequence[Example]],
    run: RunDir,
    *,
    checkpoint: str,
    epoch: float | None,
    step: int,
    eval_cfg: EvalConfig,
    gen_cfg: GenerationConfig,
    max_length: int,
    quiet: bool = False,
    token_splits: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Evaluate every split not yet in `run`'s dynamics; returns the new rows.

    Samples of the splits in `token_splits` keep per-token losses (see `evaluate_examples`).

    The per-example file is written (atomically) before the dynamics row is appended, so an
    interruption leaves either both or a samples file that the next resume overwrites.

    Launched on several processes, each evaluates its share of every split and rank 0 alone writes
    (`overmem.distributed`); every rank returns the same rows.
    """
    done = main_value(run.done)
    new_rows = []
    for split, examples in splits.items():
        if (checkpoint, split) in done:
            continue
        t0 = time.perf_counter()
        drafts = main_value(lambda split=split: previous_generations(run, split, checkpoint)) if (
            gen_cfg.reuse_drafts and eval_cfg.accuracy) else None
        samples = evaluate_sharded(
            lambda part, split=split, drafts=drafts: evaluate_examples(
                model, tokenizer, part, eval_cfg=eval_cfg, gen_cfg=gen_cfg, max_length=max_length,
                desc=f"{checkpoint}/{split}", quiet=quiet or not is_main(), token_losses=split in token_splits,
                drafts=drafts,
            ),
            tokenizer, examples, batch_size=eval_cfg.batch_size, max_length=max_length,
        )
        row = {"checkpoint": checkpoint, "epoch": epoch, "step": step, "split": split}
        row.update(split_summary(samples, eval_cfg))
        row.update(draft_totals(samples))
        row["seconds"] = round(time.perf_counter() - t0, 3)
        on_main(lambda split=split, samples=samples, row=row: (
            write_jsonl(run.samples(checkpoint, split), samples), append_jsonl(run.dynamics, row)))
        new_rows.append(row)
        if not quiet and is_main():
            tqdm.write(summary_line(row))
    return new_rows


def summary_line(row: Mapping[str, Any]) -> str:
    """The line printed for a split's dynamics row."""
    acc = "-" if row.get("accuracy") is None else f"{row['accuracy']:.3f}"
    ppl = "-" if row.get("ppl") is None else f"{row['ppl']:.3f}"
    cut = "".join(f", {row[k]} {k[2:]}" for k in ("n_truncated", "n_skipped") if k in row)
    return f"{row['checkpoint']:>12} {row['split']:>12}  ppl {ppl}  acc {acc}  (n={row['n']}{cut})"
