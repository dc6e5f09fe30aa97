"""`overmem grade`: check generations made anywhere (lm-evaluation-harness samples, a vLLM run, an
API) with overmem's answer checking and, for code, the sandbox.

The generations file is JSONL, one object per example: the text in `generation` (a string) and
optionally `id`, the dataset's own id (`HumanEval/0`, `gsm8k/test/0`). With ids (then on every
line) rows are matched to examples by id, in any order; without, by order. Everything about the
file is checked before anything is graded or written: a bad line, a missing field, an unknown,
repeated or missing id, or a count that differs from the dataset's is a `ValueError` naming the
file and line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import EvalConfig, RunConfig
from .data.code import check_answers
from .data.example import Example
from .data.splits import load_spec
from .intervals import accuracy_interval
from .results import write_json, write_jsonl
from .sandbox import Limits


def read_generations(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; each has a string `generation` and, if any
    line has an `id`, every line has one."""
    from .files import read_text

    path = Path(path)
    rows = []
    # The lines of a UTF-8 file (a BOM dropped), or an error naming it (missing, a folder or FIFO, not UTF-8).
    for lineno, line in enumerate(read_text(path, "generations file").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("generation"), str):
            found = "missing" if "generation" not in row else f"a {type(row['generation']).__name__}"
            raise ValueError(f"{path} line {lineno}: field 'generation' is {found}; each line needs the "
                             'generated text as a string: {"id": ..., "generation": "..."}')
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: no generations")
    with_id = [lineno for lineno, row in rows if "id" in row]
    if with_id and len(with_id) != len(rows):
        lineno = next(lineno for lineno, row in rows if "id" not in row)
        raise ValueError(f"{path} line {lineno}: no 'id', but line {with_id[0]} has one; give an id on every "
                         "line (matched by id) or on none (matched by order)")
    return rows


def match_generations(examples: Sequence[Example], rows: list[tuple[int, dict[str, Any]]], path: str | Path,
                      data: str) -> list[str]:
    """The generation of each example, by id when the rows have ids, else by order."""
    if "id" not in rows[0][1]:
        if len(rows) != len(examples):
            raise ValueError(f"{path}: {len(rows)} generations but {data} has {len(examples)} examples; give one "
                             "line per example, in the dataset's order (or match them by 'id')")
        return [row["generation"] for _, row in rows]
    known = {ex.id for ex in examples}
    by_id: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        ex_id = str(row["id"])
        if ex_id not in known:
            sample = ", ".join(ex.id for ex in examples[:2])
            raise ValueError(f"{path} line {lineno}: id {ex_id!r} is not an example of {data} (its ids look like "
                             f"{sample})")
        if ex_id in by_id:
            raise ValueError(f"{path} line {lineno}: id {ex_id!r} repeats line {first_line[ex_id]}")
        by_id[ex_id], first_line[ex_id] = row["generation"], lineno
    missing = [ex.id for ex in examples if ex.id not in by_id]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{path}: no generation for {len(missing)} of the {len(examples)} examples of {data} "
                         f"({shown})")
    return [by_id[ex.id] for ex in examples]


def grade_examples(examples: Sequence[Example], generations: Sequence[str], *, limits: Limits | None = None,
                   workers: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Per-example rows (id, answer, generation, extracted, correct; code adds `status` and
    `failure`) and the sandbox's description (None when there was no code)."""
    open_ended = [ex.id for ex in examples if ex.kind == "open"]
    if open_ended:
        raise ValueError(f"{len(open_ended)} examples are open-ended ({open_ended[0]}, ...): they have no automatic "
                         "check; grade them with a judge")
    rows: list[dict[str, Any]] = []
    sandbox = None
    for ex, text, check in zip(examples, generations,
                               check_answers(examples, generations, limits=limits, workers=workers)):
        row = {"id": ex.id, "answer": ex.answer, "generation": text, "extracted": check.extracted,
               "correct": check.correct}
        if check.code is not None:
            row.update(status=check.code.status, failure=check.code.failure)
            sandbox = check.code.sandbox
        rows.append(row)
    return rows, sandbox


def summary(rows: Sequence[dict[str, Any]], eval_cfg: EvalConfig) -> dict[str, Any]:
    """n, accuracy and its percentile-bootstrap interval, the interval `evaluate` reports."""
    correct = [float(r["correct"]) for r in rows]
    accuracy, low, high = accuracy_interval(correct, n_boot=eval_cfg.bootstrap, confidence=eval_cfg.confidence)
    return {"n": len(rows), "n_correct": int(sum(correct)), "accuracy": accuracy,
            "accuracy_ci_low": low, "accuracy_ci_high": high}


def grade(cfg: RunConfig, data: str, generations: str | Path, out: str | Path, *, limits: Limits | None = None,
          workers: int | None = None) -> dict[str, Any]:
    """Grade the generations in `generations` for the examples of the spec `data`.

    Writes `out` (the figures) and the per-example rows beside it (`<out stem>.samples.jsonl`),
    both only once everything is graded. Returns the figures.
    """
    examples = load_spec(cfg.data, data)
    texts = match_generations(examples, read_generations(generations), generations, data)
    rows, sandbox = grade_examples(examples, texts, limits=limits, workers=workers)
    result: dict[str, Any] = {"split": data, "generations": str(generations)}
    result.update(summary(rows, cfg.eval))
    if sandbox is not None:
        used = limits or Limits()
        result["sandbox"] = {"isolation": sandbox, "timeout_s": used.timeout_s, "memory_mb": used.memory_mb,
                             "max_processes": used.max_processes}
    out = Path(out)
    write_jsonl(out.with_name(out.stem + ".samples.jsonl"), rows)
    write_json(out, result)
    return result
