"""Any local file as `Example`s (`load_file`): a .jsonl, .json or .csv file's rows
(`overmem.data.readers`) mapped by a field map or by a recognised layout, Alpaca's
(`overmem.data.alpaca`) and GPQA's (`overmem.data.gpqa`) among them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from overmem.data.alpaca import alpaca_file_examples, is_alpaca_row
from overmem.data.answers import reference_answer
from overmem.data.example import AnswerKind, Example
from overmem.data.gpqa import gpqa_file_examples, is_gpqa_row
from overmem.data.readers import (
    Row,
    format_number,
    read_records,
    required_field,
    rows_to_examples,
    short_reference,
)
from overmem.files import kind_of


_FIELD_MAP_KEYS = ("question", "response", "answer", "id")

# Layouts recognised without a field map, tried in order; the first whose fields the first
# row has wins. A map without "answer" extracts the final answer from the response.
_AUTO_LAYOUTS: tuple[tuple[dict[str, str], AnswerKind], ...] = (
    ({"question": "question", "response": "response", "answer": "answer"}, "numeric"),  # ours
    ({"question": "query", "response": "response"}, "numeric"),  # MetaMathQA
    ({"question": "query", "response": "answer"}, "code"),  # CodeFeedback: answer = prose + code
    ({"question": "problem", "response": "solution", "answer": "answer"}, "math"),  # MATH500
    ({"question": "problem", "response": "solution"}, "math"),  # MATH
    ({"question": "question", "response": "answer"}, "numeric"),  # GSM8K: answer = solution
)


def load_file(
    path: str | os.PathLike[str],
    field_map: Mapping[str, str] | None = None,
    *,
    kind: AnswerKind | None = None,
) -> list[Example]:
    """Examples from a .jsonl, .json or .csv file.

    `field_map` maps Example fields to the file's columns: {"question": ..., "response": ...,
    "answer": ..., "id": ...}; "question" and one of "response"/"answer" are required. Without
    "answer" the final answer is extracted from the response; without "response" the response is
    the short reference "The answer is: X". Without a map, the layouts of GSM8K
    (question/answer), MetaMathQA (query/response), MATH (problem/solution[/answer]) and our own
    (question/response/answer) are recognised, and Alpaca (instruction/input/output: open-ended
    examples, `overmem.data.alpaca`), GPQA's CSV (Question/Correct Answer/...: lettered choices,
    `overmem.data.gpqa`) and CodeFeedback (query/answer: code, `overmem.data.code`).
    `kind` defaults to "math" for MATH files, "code" for CodeFeedback files, else "numeric". Ids
    are `<file stem>/<index>` unless the map names an id column.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {path} is a folder; give a .jsonl, .json or .csv file")
    if kind_of(path) is not None:  # a FIFO would be waited on forever
        raise ValueError(f"data file {path} is {kind_of(path)}, not a file; give a .jsonl, .json or .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = list(read_records(path))
    if not rows:
        raise ValueError(f"{path}: no rows")
    if field_map is None and kind in (None, "open"):
        if is_alpaca_row(rows[0][1]):  # open-ended instruction data: instruction/input/output
            return alpaca_file_examples(rows, path)
    if field_map is None and kind in (None, "choice"):
        if is_gpqa_row(rows[0][1]):  # GPQA's CSV: Question, Correct Answer, Incorrect Answer 1..3
            return gpqa_file_examples(rows, path)
    if field_map is None:
        field_map, default_kind = _detect_layout(*rows[0])
    else:
        field_map, default_kind = _check_field_map(field_map), "numeric"
    kind = kind or default_kind
    return rows_to_examples(rows, lambda row, i: _file_example(row, i, path.stem, field_map, kind))


def _detect_layout(where: str, first: Row) -> tuple[dict[str, str], AnswerKind]:
    for layout, kind in _AUTO_LAYOUTS:
        if all(column in first for column in layout.values()):
            return layout, kind
    if "question" not in first:  # the commonest mistake gets the usual missing-field message
        try:
            required_field(first, "question")
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    raise ValueError(
        f"{where}: fields {', '.join(first)} match no known layout; set a field mapping, e.g. "
        "field_map={'question': ..., 'response': ..., 'answer': ...}"
    )


def _check_field_map(field_map: Mapping[str, str]) -> dict[str, str]:
    unknown = sorted(set(field_map) - set(_FIELD_MAP_KEYS))
    if unknown:
        raise ValueError(f"field map keys {unknown} unknown; use some of {list(_FIELD_MAP_KEYS)}")
    if "question" not in field_map or not ({"response", "answer"} & set(field_map)):
        raise ValueError("field map needs 'question' and at least one of 'response', 'answer'")
    return dict(field_map)


def _file_example(
    row: Row, i: int, stem: str, field_map: dict[str, str], kind: AnswerKind
) -> Example:
    question = str(required_field(row, field_map["question"])).strip()
    response = str(required_field(row, field_map["response"])) if "response" in field_map else None
    if "answer" in field_map:
        value = required_field(row, field_map["answer"])
        number = format_number(value) if kind == "numeric" else None
        answer = number if number is not None else str(value).strip()
    else:  # _check_field_map and every auto layout guarantee a response column here
        answer = _answer_from_response(str(response), field_map["response"], kind)
    if response is None:
        response = short_reference(answer)
    ex_id = str(required_field(row, field_map["id"])) if "id" in field_map else f"{stem}/{i}"
    return Example(ex_id, question, response, answer, kind)


def _answer_from_response(response: str, column: str, kind: AnswerKind) -> str:
    try:
        return reference_answer(response, kind)
    except ValueError as err:
        raise ValueError(
            f"no final answer found in field {column!r} ({err}); if another column holds the "
            "final answer, map it: field_map={..., 'answer': <column>}"
        ) from None

