"""Rows from local files and the hub.

Files are .jsonl, .json (a list of objects, or an object of objects) or .csv; every row keeps
where it came from ("data.jsonl line 7") so that a problem is reported with its file and line.
The registered datasets (`overmem.data.builtin`) read their rows with `local_or_hub_rows` and map
them with their own functions, using the small shared pieces here (`required_field`,
`short_reference`, `format_number`); any local file is mapped to examples by
`overmem.data.file_examples.load_file`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from overmem.data.example import Example
from overmem.data.registry import DATA_DIR_ENV
from overmem.files import unreadable

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".csv")

Row = dict[str, Any]
# (where the row came from, e.g. "gsm8k/test.jsonl line 7"; the row)
LocatedRow = tuple[str, Row]


# --------------------------------------------------------------------------------------------
# Reading rows: local files (with line numbers for error messages) and the hub



def read_records(path: Path) -> Iterator[LocatedRow]:
    """Rows of a .jsonl, .json (list of objects, or object of objects) or .csv file."""
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    if suffix not in readers:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {FILE_SUFFIXES}")
    try:
        yield from readers[suffix](path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except PermissionError as err:
        raise unreadable(path, err) from None


def _read_jsonl(path: Path) -> Iterator[LocatedRow]:
    with path.open(encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first row
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}: invalid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_json(path: Path) -> Iterator[LocatedRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        hint = "; it looks like JSON Lines: rename it to .jsonl" if err.msg == "Extra data" else ""
        raise ValueError(f"{path} line {err.lineno}: invalid JSON ({err.msg}){hint}") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        # An object keyed by problem id (TabMWP's layout): keep the key as "_key".
        data = [{"_key": key, **value} for key, value in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or an object of objects)")
    for i, row in enumerate(data, start=1):
        where = f"{path} record {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def _read_csv(path: Path) -> Iterator[LocatedRow]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        while header and not header[-1]:  # trailing empty columns (a spreadsheet's export) hold nothing
            header.pop()
        for values in reader:
            if not values:  # a blank line
                continue
            # line_num is the line the record ends on (records may span lines in quoted fields).
            where = f"{path} line {reader.line_num}"
            if not any(values[len(header):]):
                values = values[: len(header)]
            if len(values) != len(header):  # a comma in an unquoted field, or a quote never closed
                raise ValueError(f"{where}: {len(values)} fields but the header has {len(header)}; quote fields "
                                 "that contain commas (and close every quote)")
            yield where, dict(zip(header, values))


def _hub_rows(hub_id: str, config: str | None, split: str) -> list[LocatedRow]:
    """Rows of a Hugging Face hub dataset (needs network access or a warm HF cache)."""
    import datasets as hf_datasets  # heavy; only the hub path needs it

    table = hf_datasets.load_dataset(hub_id, config, split=split)
    label = f"{hub_id}[{config}]" if config else hub_id
    return [(f"{label} {split} row {i}", dict(row)) for i, row in enumerate(table)]


def local_or_hub_rows(
    name: str,
    split: str,
    data_dir: Path | None,
    local: str,
    hub_id: str | None,
    hub_configs: Sequence[str | None] = (None,),
) -> list[LocatedRow]:
    """Rows from `data_dir/local` if that file exists, else from the hub (configs concatenated)."""
    if data_dir is not None and (data_dir / local).is_file():
        return list(read_records(data_dir / local))
    where = data_dir / local if data_dir is not None else f"<data folder>/{local}"
    if hub_id is None:
        raise FileNotFoundError(
            f"{name}:{split}: no file {where} and no hub copy is known; pass data_dir or set "
            f"{DATA_DIR_ENV} to a folder holding {local}"
        )
    log.info("%s:%s: no file %s; loading %s from the hub", name, split, where, hub_id)
    try:
        return [row for config in hub_configs for row in _hub_rows(hub_id, config, split)]
    except Exception as err:  # network, auth, missing `datasets`: all mean "no data here"
        raise FileNotFoundError(
            f"{name}:{split}: no file {where}, and loading {hub_id} from the hub failed "
            f"({type(err).__name__}: {err}); pass data_dir or set {DATA_DIR_ENV}"
        ) from err


def rows_to_examples(rows: Iterable[LocatedRow], make: Callable[[Row, int], Example]) -> list[Example]:
    """Map rows to Examples; any problem is reported with the row's file and line."""
    examples = []
    for i, (where, row) in enumerate(rows):
        try:
            example = make(row, i)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        for field_name in ("question", "response", "answer"):
            if not getattr(example, field_name).strip():
                raise ValueError(f"{where}: empty {field_name}")
        examples.append(example)
    return examples


# --------------------------------------------------------------------------------------------
# Small shared pieces of the row -> Example mappings


def required_field(row: Mapping[str, Any], key: str) -> Any:
    """`row[key]`; a missing (or null) field is an error that names the fields present."""
    value = row.get(key)
    if value is None:
        present = ", ".join(map(str, row)) or "none"
        raise ValueError(
            f"missing field {key!r} (fields present: {present}); set a field mapping, e.g. "
            "field_map={'question': ..., 'response': ..., 'answer': ...}"
        )
    return value


def short_reference(answer: str) -> str:
    """The response used where a dataset has no worked solution (MetaMathQA's closing line)."""
    return f"The answer is: {answer}"


def format_number(value: Any) -> str | None:
    """A number in the canonical form of `answers.py`'s numeric kind, else None.

    145.0 -> "145", "4,656" -> "4656", "3.30" -> "3.3", ".5" -> "0.5", "3/10" -> "3/10";
    "3:4", "-(1/3)", "Yes" -> None.
    """
    text = str(value).replace(",", "").strip()
    if re.fullmatch(r"-?\d+/\d+", text):
        return text
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
        return None
    number = Decimal(text)
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")
