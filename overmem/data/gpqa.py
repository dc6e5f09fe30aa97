"""GPQA (Rein et al. 2024): graduate-level science questions with four choices (paper sec. 4.4).

Read from a local copy of the authors' CSV files (the hub copy, `Idavidrein/gpqa`, is gated), with
their column names: `Question`, `Correct Answer`, `Incorrect Answer 1..3`, `Explanation`, and
`Record ID`, `High-level domain`, `Subdomain` when present.

    name          split       file under the data folder     hub fallback (gated)
    gpqa          train/test  gpqa/gpqa_main.csv             Idavidrein/gpqa (gpqa_main)
    gpqa_diamond  test        gpqa/gpqa_diamond.csv          Idavidrein/gpqa (gpqa_diamond)

A CSV in this layout given by path (`--data path/to/gpqa_extended.csv`) is read the same way,
every row, with ids `<file stem>/<index>` (`overmem.data.file_examples.load_file` recognises it).

One row -> one `Example` of kind "choice":

- the four choices are shuffled with `random.Random(f"{SEED}:{key}")`, key = the row's `Record ID`
  (its index in the file when there is none): the same order for an example on every load and
  whatever other rows the file holds. `meta` records the seed, the order (`choice_order[i]` = the
  column shown as letter i: 0 = `Correct Answer`, 1..3 = `Incorrect Answer 1..3`) and the texts;
- the question is the CSV's question followed by the lettered choices ("A. ...");
- the response, whose perplexity is tracked, is the gold reasoning chain (`Explanation`) ending
  in "The answer is (X)." (the form the choice answer rule reads first); the answer is X.

The paper's split (sec. 4.4; its Table 1 accuracies are multiples of 1/148 = 448 - 300): 300 rows
for training, the rest for evaluation. The rows are put in a seeded order (`random.Random(SEED)`
shuffle of the row indices); `train` is the first `TRAIN_SIZE`, `test` the rest, each in file
order. Ids are `gpqa/<split>/<row index in the file>`.

A missing column or an empty question, choice or explanation is an error naming the file, the
line and the column. The choice rule reads a text's first "answer is X": an explanation that
states an answer of its own first ("the answer is D-glucose") reads as another letter; loading
logs a warning with the count of such references.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from overmem.data.answers import CHOICE_LETTERS, extract_answer
from overmem.data.example import Example
from overmem.data.readers import LocatedRow, Row, local_or_hub_rows, rows_to_examples
from overmem.data.registry import register_dataset

log = logging.getLogger(__name__)

SEED = 0
TRAIN_SIZE = 300  # paper sec. 4.4: "300 training examples and the remainder for evaluation"
HUB_ID = "Idavidrein/gpqa"
CHOICE_COLUMNS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
REQUIRED_COLUMNS = ("Question", *CHOICE_COLUMNS, "Explanation")


def _cell(row: Row, column: str) -> str:
    """The stripped text of `column`; a missing column or an empty cell is an error."""
    if column not in row or row[column] is None:
        present = ", ".join(map(str, row)) or "none"
        raise ValueError(f"missing column {column!r} (columns present: {present}); GPQA's CSV has "
                         f"{', '.join(REQUIRED_COLUMNS)}")
    text = str(row[column]).strip()
    if not text:
        raise ValueError(f"empty column {column!r}; every GPQA row needs a question, four choices and an explanation")
    return text


def choice_order(key: str, seed: int = SEED) -> list[int]:
    """The shuffled order of the four choice columns for the example `key` (0 = the correct one)."""
    order = list(range(len(CHOICE_COLUMNS)))
    random.Random(f"{seed}:{key}").shuffle(order)
    return order


def gpqa_example(row: Row, index: int, ex_id: str, seed: int = SEED) -> Example:
    """One GPQA row (the `index`-th of its file) as a lettered multiple-choice `Example`."""
    question = _cell(row, "Question")
    texts = [_cell(row, column) for column in CHOICE_COLUMNS]
    explanation = _cell(row, "Explanation")
    record_id = str(row.get("Record ID") or "").strip() or None
    order = choice_order(record_id or str(index), seed)
    shown = [texts[i] for i in order]
    letter = CHOICE_LETTERS[order.index(0)]
    lettered = "\n".join(f"{CHOICE_LETTERS[i]}. {text}" for i, text in enumerate(shown))
    response = f"{explanation}\nThe answer is ({letter})."
    meta: dict[str, Any] = {
        "record_id": record_id, "seed": seed, "choice_order": order, "choices": shown,
        "domain": row.get("High-level domain"), "subdomain": row.get("Subdomain"),
    }
    return Example(ex_id, f"{question}\n{lettered}", response, letter, "choice", meta)


def split_indices(n: int, split: str, seed: int = SEED, train_size: int = TRAIN_SIZE) -> list[int]:
    """Row indices of `split` ("train": the first `train_size` of a seeded order; "test": the
    rest; "all": every row), in file order."""
    if split == "all":
        return list(range(n))
    if n <= train_size:
        raise ValueError(f"GPQA has {n} rows; the paper's split needs more than {train_size} "
                         "(use gpqa_main.csv, 448 rows)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = order[:train_size] if split == "train" else order[train_size:]
    return sorted(chosen)


def is_gpqa_row(row: Row) -> bool:
    """Whether a row is in GPQA's layout (a `Question` and a `Correct Answer` column)."""
    return "Question" in row and "Correct Answer" in row


def gpqa_file_examples(rows: Sequence[LocatedRow], path: str | os.PathLike[str]) -> list[Example]:
    """Every row of a GPQA-format file given by path, ids `<file stem>/<index>` (no split)."""
    stem = Path(path).stem
    return rows_to_examples(rows, lambda row, i: gpqa_example(row, i, f"{stem}/{i}"))


def _load(name: str, split: str, data_dir: Path | None, file: str, config: str, *, paper_split: bool) -> list[Example]:
    # The hub copy has a single split, "train", holding every row.
    rows: Sequence[LocatedRow] = local_or_hub_rows(name, "train", data_dir, file, HUB_ID, (config,))
    # Every row is mapped, so that a bad row is reported whichever split is asked for.
    examples = rows_to_examples(rows, lambda row, i: gpqa_example(row, i, f"{name}/{split}/{i}"))
    chosen = [examples[i] for i in split_indices(len(rows), split if paper_split else "all")]
    # The choice rule reads the FIRST "answer is X" of a text: an explanation saying "the answer is
    # D-glucose" reads as D. Such references are counted, so that a user knows to look.
    misread = [ex.id for ex in chosen if extract_answer(ex.response, "choice") != ex.answer]
    if misread:
        log.warning("%s:%s: %d reference(s) read by the choice rule as another letter than their answer "
                    "(their explanation states an answer first), e.g. %s", name, split, len(misread), misread[0])
    return chosen


@register_dataset("gpqa", kind="choice", hub_id=HUB_ID, splits=("train", "test"),
                  description="GPQA main (448): 300 train / 148 test as in the paper; explanation = response")
def load_gpqa(split: str, data_dir: Path | None) -> list[Example]:
    """GPQA main, the paper's seeded 300 / rest split (module docstring)."""
    return _load("gpqa", split, data_dir, "gpqa/gpqa_main.csv", "gpqa_main", paper_split=True)


@register_dataset("gpqa_diamond", kind="choice", hub_id=HUB_ID, splits=("test",),
                  description="GPQA diamond (198), evaluation only; explanation = response")
def load_gpqa_diamond(split: str, data_dir: Path | None) -> list[Example]:
    """GPQA diamond, every row (an evaluation set)."""
    return _load("gpqa_diamond", split, data_dir, "gpqa/gpqa_diamond.csv", "gpqa_diamond", paper_split=False)
