"""Open-ended instruction data in the Alpaca format (`instruction`, `input`, `output`).

    name            split  file under the data folder                    hub fallback
    alpaca_cleaned  train  alpaca_cleaned/alpaca_data_cleaned.json       yahma/alpaca-cleaned

Any local .json/.jsonl/.csv file whose rows have `instruction` and `output` is read the same way
(`overmem.data.file_examples.load_file` recognises the layout), so `data.train: my_data.jsonl` works.

One row -> one `Example` of answer kind "open": the question is the instruction, followed by a
blank line and the `input` when there is one (the paper's template has a single instruction slot);
the response, whose perplexity is tracked, is the `output`. An open answer has no automatic check:
the training-time accuracy of such examples is not measured (null in the dynamics rows), and
`answer` holds the reference output, the text an LLM judge compares a generation with (the `judge`
analysis). A missing `instruction`/`output` column or an empty cell is an error naming the row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from overmem.data.example import Example
from overmem.data.readers import Row, local_or_hub_rows, rows_to_examples
from overmem.data.registry import register_dataset

REQUIRED_FIELDS = ("instruction", "output")


def is_alpaca_row(row: Mapping[str, Any]) -> bool:
    """Whether a row is in the Alpaca layout (it has `instruction` and `output`)."""
    return all(field in row for field in REQUIRED_FIELDS)


def _text(row: Row, field: str) -> str:
    value = row.get(field)
    if value is None:
        present = ", ".join(map(str, row)) or "none"
        raise ValueError(f"missing field {field!r} (fields present: {present}); an Alpaca row has "
                         "instruction, input (optional) and output")
    return str(value).strip()


def alpaca_example(row: Row, ex_id: str) -> Example:
    """One Alpaca row as an open-ended `Example` (module docstring)."""
    instruction, output = _text(row, "instruction"), _text(row, "output")
    for field, text in (("instruction", instruction), ("output", output)):
        if not text:
            raise ValueError(f"empty field {field!r}")
    extra = str(row.get("input") or "").strip()
    question = f"{instruction}\n\n{extra}" if extra else instruction
    return Example(ex_id, question, output, output, "open", {"instruction": instruction, "input": extra})


def alpaca_file_examples(rows: list[tuple[str, Row]], path: str | os.PathLike[str]) -> list[Example]:
    """The rows of a local Alpaca-format file as Examples, ids `<file stem>/<index>`."""
    stem = Path(path).stem
    return rows_to_examples(rows, lambda row, i: alpaca_example(row, f"{stem}/{i}"))


@register_dataset("alpaca_cleaned", kind="open", hub_id="yahma/alpaca-cleaned", splits=("train",),
                  description="AlpacaCleaned (51,760) instruction data; open-ended, tracked by perplexity only")
def load_alpaca_cleaned(split: str, data_dir: Path | None) -> list[Example]:
    """AlpacaCleaned from the data folder, else the hub."""
    rows = local_or_hub_rows("alpaca_cleaned", split, data_dir, "alpaca_cleaned/alpaca_data_cleaned.json",
                             "yahma/alpaca-cleaned")
    return rows_to_examples(rows, lambda row, i: alpaca_example(row, f"alpaca_cleaned/{split}/{i}"))
