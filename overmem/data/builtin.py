"""The built-in datasets: one row -> Example mapping each, registered under its name.

Every source becomes a list of `Example`s (see `example.py`). Each dataset is read from its file
under the data folder (`overmem.data.registry.resolve_data_dir`), laid out like `shared/data`.
When the file is missing there and the dataset has a hub copy, it is fetched with
`datasets.load_dataset` instead; the same row -> Example mapping serves both paths. Ids are
`name/split/index` with the index in the source file, so a hub copy whose rows come in another
order gets other ids.

    name            split      file under the data folder               hub fallback
    gsm8k           train/test gsm8k/{train,test}.jsonl                 openai/gsm8k (main)
    metamathqa      train      metamathqa/MetaMathQA-395K.json          meta-math/MetaMathQA
    gsm8k_backward  test       metamath_eval/GSM8K_Backward.jsonl       -
    math            test       math_test/MATH_test_5000_tora.jsonl      EleutherAI/hendrycks_math
    math            train      math_train/train.jsonl                   EleutherAI/hendrycks_math
    math500         test       math_test/MATH500_test.jsonl             HuggingFaceH4/MATH-500
    svamp           test       svamp/SVAMP.json                         -
    asdiv           test       asdiv/asdiv_test_tora.jsonl              -
    mawps           test       mawps/tora_mawps_test.jsonl              -
    tabmwp          test/dev   tabmwp/problems_{test1k,dev1k}.json      -
    mmlu_stem       test       mmlu_stem/mmlu_stem_test_qwen25math.jsonl cais/mmlu (18 subjects)

Registered by their own modules (imported on first use; layouts in their docstrings):

    gpqa            train/test gpqa/gpqa_main.csv (300 / rest, seeded)  Idavidrein/gpqa (gated)
    gpqa_diamond    test       gpqa/gpqa_diamond.csv                    Idavidrein/gpqa (gated)
    alpaca_cleaned  train      alpaca_cleaned/alpaca_data_cleaned.json  yahma/alpaca-cleaned
    humaneval       test       humaneval/HumanEval.jsonl                openai/openai_humaneval
    codefeedback    train      codefeedback/CodeFeedback-Filtered-Instruction.jsonl  m-a-p/CodeFeedback-Filtered-Instruction

SVAMP, ASDiv, MAWPS, GSM8K-Backward and MMLU-STEM come without a worked solution; their
`response` is the short reference `"The answer is: X"` (MetaMathQA's closing line), so their
perplexity measures little more than the final answer's likelihood. ASDiv, MAWPS, TabMWP and
MMLU-STEM use the files of the ToRA / Qwen2.5-Math evaluation harnesses, whose benchmark list
matches the paper's OOD table (Minerva-MATH has no local copy). HumanEval and CodeFeedback
(answers checked by running code) are registered in `overmem.data.code`.

Importing this module registers them; the registry imports it on the first dataset lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from overmem.data.answers import reference_answer
from overmem.data.example import AnswerKind, Example
from overmem.data.readers import (
    Row,
    format_number,
    local_or_hub_rows,
    required_field,
    rows_to_examples,
    short_reference,
)
from overmem.data.registry import register_dataset

# --------------------------------------------------------------------------------------------
# Small shared pieces of the mappings



def _answer_and_kind(value: Any) -> tuple[str, AnswerKind]:
    """("145", "numeric") for numbers and a/b fractions; anything else ("3:4", "Mrs. Hilt") is
    left to "math", whose checker compares text exactly before trying math-verify."""
    number = format_number(value)
    return (number, "numeric") if number is not None else (str(value).strip(), "math")


def _join_body_question(body: str, question: str) -> str:
    """SVAMP/ASDiv split a problem into body and question; some bodies lack a final period."""
    body, question = body.strip(), question.strip()
    if body and body[-1].isalnum():
        body += "."
    return f"{body} {question}"


_LETTERS = "ABCDEFGHIJ"


def _lettered(choices: Sequence[Any]) -> str:
    if len(choices) > len(_LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(_LETTERS)} are supported")
    return "\n".join(f"{letter}. {choice}" for letter, choice in zip(_LETTERS, choices))


# --------------------------------------------------------------------------------------------
# Registered datasets: one row -> Example mapping per dataset, shared by the local and hub paths


def _register_builtin(
    name: str,
    *,
    kind: AnswerKind,
    files: Mapping[str, str],
    to_example: Callable[[Row, str], Example],
    description: str,
    hub_id: str | None = None,
    hub_configs: Sequence[str | None] = (None,),
) -> None:
    """Register `name`, read from `files[split]` under the data folder, else from the hub.

    `to_example(row, id)` maps one row; with several `hub_configs` (per-subject configs on the
    hub) their rows are concatenated in the order given.
    """

    def load(split: str, data_dir: Path | None) -> list[Example]:
        rows = local_or_hub_rows(name, split, data_dir, files[split], hub_id, hub_configs)
        return rows_to_examples(rows, lambda row, i: to_example(row, f"{name}/{split}/{i}"))

    load.__qualname__ = f"load_{name}"
    splits = tuple(files)
    register_dataset(name, kind=kind, hub_id=hub_id, splits=splits, description=description)(load)


def _gsm8k_example(row: Row, ex_id: str) -> Example:
    response = str(required_field(row, "answer"))
    question = str(required_field(row, "question"))
    return Example(ex_id, question, response, reference_answer(response, "numeric"), "numeric")


def _metamathqa_example(row: Row, ex_id: str) -> Example:
    response = str(required_field(row, "response"))
    row_type = str(row.get("type", ""))
    kind: AnswerKind = "math" if row_type.startswith("MATH") else "numeric"
    answer = reference_answer(response, kind)
    return Example(ex_id, str(required_field(row, "query")), response, answer, kind, {"type": row_type})


def _gsm8k_backward_example(row: Row, ex_id: str) -> Example:
    answer, kind = _answer_and_kind(required_field(row, "answer"))
    meta = {"original_question": row.get("original_question")}
    question = str(required_field(row, "question"))
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


def _math_example(row: Row, ex_id: str) -> Example:
    solution = str(required_field(row, "solution"))
    # MATH500 carries an `answer` field; the full MATH files only have the \boxed{} in the solution.
    answer = row.get("answer") or reference_answer(solution, "math")
    # MATH500 says subject=..., level=2; the full MATH files say type=..., level="Level 2".
    level = row.get("level")
    if isinstance(level, str) and re.fullmatch(r"Level \d+", level):
        level = int(level.split()[1])
    meta = {"subject": row.get("subject") or row.get("type"), "level": level}
    if "unique_id" in row:
        meta["unique_id"] = row["unique_id"]
    return Example(ex_id, str(required_field(row, "problem")), solution, str(answer), "math", meta)


def _svamp_example(row: Row, ex_id: str) -> Example:
    answer, kind = _answer_and_kind(required_field(row, "Answer"))
    question = _join_body_question(str(required_field(row, "Body")), str(required_field(row, "Question")))
    meta = {"source_id": row.get("ID"), "type": row.get("Type"), "equation": row.get("Equation")}
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


# ASDiv answers carry a unit in parentheses: "9 (apples)". Only a trailing group containing a
# letter is a unit; "-(1/3)" is an answer.
_ASDIV_UNIT = re.compile(r"\s*\([^()]*[A-Za-z][^()]*\)\s*$")


def _asdiv_example(row: Row, ex_id: str) -> Example:
    raw = str(required_field(row, "answer"))
    answer, kind = _answer_and_kind(_ASDIV_UNIT.sub("", raw))
    question = _join_body_question(str(required_field(row, "body")), str(required_field(row, "question")))
    meta = {"solution_type": row.get("solution_type"), "formula": row.get("formula")}
    meta["answer_raw"] = raw
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


def _mawps_example(row: Row, ex_id: str) -> Example:
    answer, kind = _answer_and_kind(required_field(row, "target"))
    question = str(required_field(row, "input")).strip()
    meta = {"source": row.get("type")}
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


def _tabmwp_question(row: Row) -> str:
    """Title, pipe table, question (with unit), and lettered choices when there are any."""
    title = row.get("table_title")
    question = str(required_field(row, "question")).strip()
    if row.get("unit"):
        question += f" (Unit: {row['unit']})"
    parts = [f"Table: {title}" if title else "Table:", str(required_field(row, "table")), "", question]
    if row.get("choices"):
        parts.append(_lettered(row["choices"]))
    return "\n".join(parts)


def _tabmwp_example(row: Row, ex_id: str) -> Example:
    raw = str(required_field(row, "answer"))
    choices = row.get("choices")
    if choices:
        if raw not in choices:
            raise ValueError(f"answer {raw!r} is not among the choices {choices}")
        answer, kind = _LETTERS[choices.index(raw)], "choice"
    else:
        answer, kind = _answer_and_kind(raw)
    meta = {k: row.get(k) for k in ("ques_type", "ans_type", "grade")}
    meta.update(pid=row.get("_key"), answer_text=raw)
    # The worked solution states the answer in words ("The function is nonlinear."), not the
    # letter: fine for perplexity, but do not train on it expecting letters.
    solution = str(required_field(row, "solution"))
    return Example(ex_id, _tabmwp_question(row), solution, answer, kind, meta)


def _mmlu_example(row: Row, ex_id: str) -> Example:
    choices = list(required_field(row, "choices"))
    index = int(required_field(row, "answer"))
    if not 0 <= index < len(choices):
        raise ValueError(f"answer index {index} outside the {len(choices)} choices")
    question = f"{str(required_field(row, 'question')).strip()}\n{_lettered(choices)}"
    answer = _LETTERS[index]
    # The Qwen2.5-Math copy names the subject "type", cais/mmlu names it "subject".
    meta = {"subject": row.get("subject") or row.get("type"), "choices": choices}
    return Example(ex_id, question, short_reference(answer), answer, "choice", meta)


MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)  # fmt: skip
MMLU_STEM_SUBJECTS = (
    "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics",
    "machine_learning",
)  # fmt: skip

_register_builtin(
    "gsm8k",
    kind="numeric",
    files={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    to_example=_gsm8k_example,
    hub_id="openai/gsm8k",
    hub_configs=("main",),
    description="GSM8K grade-school math (7,473 / 1,319); response = the reference solution",
)
_register_builtin(
    "metamathqa",
    kind="numeric",
    files={"train": "metamathqa/MetaMathQA-395K.json"},
    to_example=_metamathqa_example,
    hub_id="meta-math/MetaMathQA",
    description="MetaMathQA 395K, the paper's training set; MATH_* rows get kind 'math'",
)
_register_builtin(
    "gsm8k_backward",
    kind="numeric",
    files={"test": "metamath_eval/GSM8K_Backward.jsonl"},
    to_example=_gsm8k_backward_example,
    description="MetaMath's GSM8K backward-reasoning eval (1,270); short reference response",
)
_register_builtin(
    "math",
    kind="math",
    files={"train": "math_train/train.jsonl", "test": "math_test/MATH_test_5000_tora.jsonl"},
    to_example=_math_example,
    hub_id="EleutherAI/hendrycks_math",
    hub_configs=MATH_SUBJECTS,
    description="MATH (7,500 / 5,000); response = solution, answer = its last \\boxed{}",
)
_register_builtin(
    "math500",
    kind="math",
    files={"test": "math_test/MATH500_test.jsonl"},
    to_example=_math_example,
    hub_id="HuggingFaceH4/MATH-500",
    description="MATH500, PRM800K's 500-problem subset of the MATH test set",
)
_register_builtin(
    "svamp",
    kind="numeric",
    files={"test": "svamp/SVAMP.json"},
    to_example=_svamp_example,
    description="SVAMP challenge set (1,000); short reference response",
)
_register_builtin(
    "asdiv",
    kind="numeric",
    files={"test": "asdiv/asdiv_test_tora.jsonl"},
    to_example=_asdiv_example,
    description="ASDiv as cleaned by ToRA (2,215); ratios, times, names get kind 'math'",
)
_register_builtin(
    "mawps",
    kind="numeric",
    files={"test": "mawps/tora_mawps_test.jsonl"},
    to_example=_mawps_example,
    description="MAWPS as in ToRA (2,065 = addsub + multiarith + singleeq + singleop)",
)
_register_builtin(
    "tabmwp",
    kind="numeric",
    files={"test": "tabmwp/problems_test1k.json", "dev": "tabmwp/problems_dev1k.json"},
    to_example=_tabmwp_example,
    description="TabMWP test1k / dev1k; table in the question; multiple choice -> letters",
)
_register_builtin(
    "mmlu_stem",
    kind="choice",
    files={"test": "mmlu_stem/mmlu_stem_test_qwen25math.jsonl"},
    to_example=_mmlu_example,
    hub_id="cais/mmlu",
    hub_configs=MMLU_STEM_SUBJECTS,
    description="MMLU, 18 STEM subjects (3,018); lettered choices, answer letter",
)
