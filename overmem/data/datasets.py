"""Datasets: named loaders, generic file loading, data specs, and the paper's MetaTrain/MetaTest.

Every source becomes a list of `Example`s (see `example.py`).

Spec syntax (`parse_spec`, `load_dataset_spec`)
-----------------------------------------------
    NAME[:SPLIT][[START:STOP]][@N[,seed=S]]
    PATH[[START:STOP]][@N[,seed=S]]

    gsm8k:test                  the whole GSM8K test split
    gsm8k:train[:1000]          its first 1000 examples
    gsm8k:test[100:200]         examples 100..199 (Python slice; asking past the end is an error)
    svamp                       SPLIT may be left out when the dataset has a single split
    gsm8k:test@200              200 examples sampled without replacement (seed from the caller)
    gsm8k:test[:500]@100,seed=3 slice first, then sample 100 with seed 3
    path/to/file.jsonl[:50]     a local .jsonl / .json / .csv file
    synthetic:test              a dataset registered by another module (imported lazily)

A spec is a file path when it contains "/" or "\\" or ends in .jsonl, .json or .csv.
Sampling uses `random.Random(seed)` and keeps the source order of the sampled examples.

Local layout
------------
Registered datasets are read from a data folder (argument `data_dir`, else the environment
variable OVERMEM_DATA_DIR) laid out like `shared/data`. When the file is missing there and
the dataset has a hub copy, it is fetched with `datasets.load_dataset` instead; the same
row -> Example mapping serves both paths. Ids are `name/split/index` with the index in the
source file, so a hub copy whose rows come in another order gets other ids.

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

SVAMP, ASDiv, MAWPS, GSM8K-Backward and MMLU-STEM come without a worked solution; their
`response` is the short reference `"The answer is: X"` (MetaMathQA's closing line), so their
perplexity measures little more than the final answer's likelihood. ASDiv, MAWPS, TabMWP and
MMLU-STEM use the files of the ToRA / Qwen2.5-Math evaluation harnesses, whose benchmark list
matches the paper's OOD table (Minerva-MATH has no local copy). HumanEval is not registered: its
answers are checked by running code, which no `AnswerKind` covers.
"""

from __future__ import annotations

import csv
import difflib
import importlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from overmem.data.answers import reference_answer
from overmem.data.example import AnswerKind, Example

log = logging.getLogger(__name__)

DATA_DIR_ENV = "OVERMEM_DATA_DIR"
FILE_SUFFIXES = (".jsonl", ".json", ".csv")

Loader = Callable[[str, Path | None], list[Example]]
Row = dict[str, Any]
# (where the row came from, e.g. "gsm8k/test.jsonl line 7"; the row)
LocatedRow = tuple[str, Row]


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its loader and the facts a caller needs before loading it."""

    name: str
    kind: AnswerKind
    loader: Loader
    hub_id: str | None
    splits: tuple[str, ...]
    description: str


_REGISTRY: dict[str, DatasetInfo] = {}
# Datasets registered by other modules; imported on first use so this module stays light.
_LAZY_MODULES: dict[str, str] = {"synthetic": "overmem.data.synthetic"}


def register_dataset(
    name: str,
    *,
    kind: AnswerKind,
    hub_id: str | None = None,
    splits: Sequence[str] = ("test",),
    description: str = "",
) -> Callable[[Loader], Loader]:
    """Decorator registering `fn(split, data_dir) -> list[Example]` under `name`.

    `data_dir` is the resolved data folder or None (no folder given: use the hub or ignore it).
    Registering a name twice from different functions is an error.
    """
    if not splits:
        raise ValueError(f"dataset {name!r}: splits must not be empty")

    def decorator(fn: Loader) -> Loader:
        old = _REGISTRY.get(name)
        origin = (fn.__module__, fn.__qualname__)
        if old is not None and (old.loader.__module__, old.loader.__qualname__) != origin:
            raise ValueError(
                f"dataset {name!r} is already registered by "
                f"{old.loader.__module__}.{old.loader.__qualname__}"
            )
        _REGISTRY[name] = DatasetInfo(name, kind, fn, hub_id, tuple(splits), description)
        return fn

    return decorator


def list_datasets() -> list[str]:
    """Names of all datasets, including those whose module is imported only on use."""
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def get_dataset(name: str) -> DatasetInfo:
    """The registered dataset `name`; unknown names raise ValueError with the closest match."""
    if name not in _REGISTRY and name in _LAZY_MODULES:
        _import_provider(name, _LAZY_MODULES[name])
    if name in _REGISTRY:
        return _REGISTRY[name]
    known = list_datasets()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f": did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}{hint} (known: {', '.join(known)})")


def _import_provider(name: str, module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise ValueError(
            f"dataset {name!r} is provided by module {module}, which is missing from this install"
        ) from None
    if name not in _REGISTRY:
        raise ValueError(f"module {module} was imported but did not register dataset {name!r}")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The data folder: `data_dir`, else $OVERMEM_DATA_DIR, else None (hub only)."""
    raw = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        source = "data_dir" if data_dir is not None else DATA_DIR_ENV
        raise FileNotFoundError(f"data folder {path} (from {source}) does not exist")
    return path


def load_registered(
    name: str, split: str | None = None, data_dir: str | os.PathLike[str] | None = None
) -> list[Example]:
    """All examples of one split of a registered dataset (split may be omitted if unique)."""
    info = get_dataset(name)
    return info.loader(_check_split(info, split), resolve_data_dir(data_dir))


def _check_split(info: DatasetInfo, split: str | None) -> str:
    valid = ", ".join(info.splits)
    if split is None:
        if len(info.splits) == 1:
            return info.splits[0]
        raise ValueError(
            f"dataset {info.name!r} has several splits; name one ({valid}), e.g. "
            f"{info.name}:{info.splits[0]}"
        )
    if split not in info.splits:
        raise ValueError(f"dataset {info.name!r} has no split {split!r} (valid splits: {valid})")
    return split


# --------------------------------------------------------------------------------------------
# Reading rows: local files (with line numbers for error messages) and the hub


def _read_records(path: Path) -> Iterator[LocatedRow]:
    """Rows of a .jsonl, .json (list of objects, or object of objects) or .csv file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {FILE_SUFFIXES}")


def _read_jsonl(path: Path) -> Iterator[LocatedRow]:
    with path.open(encoding="utf-8") as f:
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
        data = json.loads(path.read_text(encoding="utf-8"))
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
        reader = csv.DictReader(f)
        for row in reader:
            # line_num is the line the record ends on (records may span lines in quoted fields).
            yield f"{path} line {reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _hub_rows(hub_id: str, config: str | None, split: str) -> list[LocatedRow]:
    """Rows of a Hugging Face hub dataset (needs network access or a warm HF cache)."""
    import datasets as hf_datasets  # heavy; only the hub path needs it

    table = hf_datasets.load_dataset(hub_id, config, split=split)
    label = f"{hub_id}[{config}]" if config else hub_id
    return [(f"{label} {split} row {i}", dict(row)) for i, row in enumerate(table)]


def _rows(
    name: str,
    split: str,
    data_dir: Path | None,
    local: str,
    hub_id: str | None,
    hub_configs: Sequence[str | None] = (None,),
) -> list[LocatedRow]:
    """Rows from `data_dir/local` if that file exists, else from the hub (configs concatenated)."""
    if data_dir is not None and (data_dir / local).is_file():
        return list(_read_records(data_dir / local))
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


def _to_examples(rows: Iterable[LocatedRow], make: Callable[[Row, int], Example]) -> list[Example]:
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


def _field(row: Mapping[str, Any], key: str) -> Any:
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
        rows = _rows(name, split, data_dir, files[split], hub_id, hub_configs)
        return _to_examples(rows, lambda row, i: to_example(row, f"{name}/{split}/{i}"))

    load.__qualname__ = f"load_{name}"
    splits = tuple(files)
    register_dataset(name, kind=kind, hub_id=hub_id, splits=splits, description=description)(load)


def _gsm8k_example(row: Row, ex_id: str) -> Example:
    response = str(_field(row, "answer"))
    question = str(_field(row, "question"))
    return Example(ex_id, question, response, reference_answer(response, "numeric"), "numeric")


def _metamathqa_example(row: Row, ex_id: str) -> Example:
    response = str(_field(row, "response"))
    row_type = str(row.get("type", ""))
    kind: AnswerKind = "math" if row_type.startswith("MATH") else "numeric"
    answer = reference_answer(response, kind)
    return Example(ex_id, str(_field(row, "query")), response, answer, kind, {"type": row_type})


def _gsm8k_backward_example(row: Row, ex_id: str) -> Example:
    answer, kind = _answer_and_kind(_field(row, "answer"))
    meta = {"original_question": row.get("original_question")}
    question = str(_field(row, "question"))
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


def _math_example(row: Row, ex_id: str) -> Example:
    solution = str(_field(row, "solution"))
    # MATH500 carries an `answer` field; the full MATH files only have the \boxed{} in the solution.
    answer = row.get("answer") or reference_answer(solution, "math")
    # MATH500 says subject=..., level=2; the full MATH files say type=..., level="Level 2".
    level = row.get("level")
    if isinstance(level, str) and re.fullmatch(r"Level \d+", level):
        level = int(level.split()[1])
    meta = {"subject": row.get("subject") or row.get("type"), "level": level}
    if "unique_id" in row:
        meta["unique_id"] = row["unique_id"]
    return Example(ex_id, str(_field(row, "problem")), solution, str(answer), "math", meta)


def _svamp_example(row: Row, ex_id: str) -> Example:
    answer, kind = _answer_and_kind(_field(row, "Answer"))
    question = _join_body_question(str(_field(row, "Body")), str(_field(row, "Question")))
    meta = {"source_id": row.get("ID"), "type": row.get("Type"), "equation": row.get("Equation")}
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


# ASDiv answers carry a unit in parentheses: "9 (apples)". Only a trailing group containing a
# letter is a unit; "-(1/3)" is an answer.
_ASDIV_UNIT = re.compile(r"\s*\([^()]*[A-Za-z][^()]*\)\s*$")


def _asdiv_example(row: Row, ex_id: str) -> Example:
    raw = str(_field(row, "answer"))
    answer, kind = _answer_and_kind(_ASDIV_UNIT.sub("", raw))
    question = _join_body_question(str(_field(row, "body")), str(_field(row, "question")))
    meta = {"solution_type": row.get("solution_type"), "formula": row.get("formula")}
    meta["answer_raw"] = raw
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


def _mawps_example(row: Row, ex_id: str) -> Example:
    answer, kind = _answer_and_kind(_field(row, "target"))
    question = str(_field(row, "input")).strip()
    meta = {"source": row.get("type")}
    return Example(ex_id, question, short_reference(answer), answer, kind, meta)


def _tabmwp_question(row: Row) -> str:
    """Title, pipe table, question (with unit), and lettered choices when there are any."""
    title = row.get("table_title")
    question = str(_field(row, "question")).strip()
    if row.get("unit"):
        question += f" (Unit: {row['unit']})"
    parts = [f"Table: {title}" if title else "Table:", str(_field(row, "table")), "", question]
    if row.get("choices"):
        parts.append(_lettered(row["choices"]))
    return "\n".join(parts)


def _tabmwp_example(row: Row, ex_id: str) -> Example:
    raw = str(_field(row, "answer"))
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
    solution = str(_field(row, "solution"))
    return Example(ex_id, _tabmwp_question(row), solution, answer, kind, meta)


def _mmlu_example(row: Row, ex_id: str) -> Example:
    choices = list(_field(row, "choices"))
    index = int(_field(row, "answer"))
    if not 0 <= index < len(choices):
        raise ValueError(f"answer index {index} outside the {len(choices)} choices")
    question = f"{str(_field(row, 'question')).strip()}\n{_lettered(choices)}"
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


# --------------------------------------------------------------------------------------------
# Any local file


_FIELD_MAP_KEYS = ("question", "response", "answer", "id")

# Layouts recognised without a field map, tried in order; the first whose fields the first
# row has wins. A map without "answer" extracts the final answer from the response.
_AUTO_LAYOUTS: tuple[tuple[dict[str, str], AnswerKind], ...] = (
    ({"question": "question", "response": "response", "answer": "answer"}, "numeric"),  # ours
    ({"question": "query", "response": "response"}, "numeric"),  # MetaMathQA
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
    (question/response/answer) are recognised. `kind` defaults to "math" for MATH files, else
    "numeric". Ids are `<file stem>/<index>` unless the map names an id column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = list(_read_records(path))
    if not rows:
        raise ValueError(f"{path}: no rows")
    if field_map is None:
        field_map, default_kind = _detect_layout(*rows[0])
    else:
        field_map, default_kind = _check_field_map(field_map), "numeric"
    kind = kind or default_kind
    return _to_examples(rows, lambda row, i: _file_example(row, i, path.stem, field_map, kind))


def _detect_layout(where: str, first: Row) -> tuple[dict[str, str], AnswerKind]:
    for layout, kind in _AUTO_LAYOUTS:
        if all(column in first for column in layout.values()):
            return layout, kind
    if "question" not in first:  # the commonest mistake gets the usual missing-field message
        try:
            _field(first, "question")
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
    question = str(_field(row, field_map["question"])).strip()
    response = str(_field(row, field_map["response"])) if "response" in field_map else None
    if "answer" in field_map:
        value = _field(row, field_map["answer"])
        number = format_number(value) if kind == "numeric" else None
        answer = number if number is not None else str(value).strip()
    else:  # _check_field_map and every auto layout guarantee a response column here
        answer = _answer_from_response(str(response), field_map["response"], kind)
    if response is None:
        response = short_reference(answer)
    ex_id = str(_field(row, field_map["id"])) if "id" in field_map else f"{stem}/{i}"
    return Example(ex_id, question, response, answer, kind)


def _answer_from_response(response: str, column: str, kind: AnswerKind) -> str:
    try:
        return reference_answer(response, kind)
    except ValueError as err:
        raise ValueError(
            f"no final answer found in field {column!r} ({err}); if another column holds the "
            "final answer, map it: field_map={..., 'answer': <column>}"
        ) from None


# --------------------------------------------------------------------------------------------
# Specs: "name:split[a:b]@n,seed=s" or "path[a:b]@n,seed=s"


@dataclass(frozen=True)
class DataSpec:
    """What to load: a registered name (with split) or a file path, a slice, a seeded sample."""

    name_or_path: str
    split: str | None = None
    start: int | None = None
    stop: int | None = None
    sample: int | None = None
    seed: int = 0

    @property
    def is_file(self) -> bool:
        return _looks_like_path(self.name_or_path)

    def unsliced(self) -> DataSpec:
        """The whole source: the same dataset and split without slice or sample."""
        return replace(self, start=None, stop=None, sample=None)

    def __str__(self) -> str:
        text = self.name_or_path
        if self.split is not None:
            text += f":{self.split}"
        if self.start is not None or self.stop is not None:
            start, stop = ("" if b is None else b for b in (self.start, self.stop))
            text += f"[{start}:{stop}]"
        if self.sample is not None:
            text += f"@{self.sample},seed={self.seed}"
        return text


_SPEC_RE = re.compile(
    r"(?P<body>.+?)"
    r"(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?"
    r"(?:@(?P<sample>\d+)(?:,seed=(?P<seed>-?\d+))?)?"
)
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_SPEC_HELP = "expected NAME:SPLIT[START:STOP]@N,seed=S or PATH[START:STOP], e.g. gsm8k:train[:1000]"


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(FILE_SUFFIXES)


def parse_spec(text: str, *, seed: int = 0) -> DataSpec:
    """Parse a spec string (syntax in the module docstring); `seed` applies if the text has none."""
    match = _SPEC_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad data spec {text!r}: {_SPEC_HELP}")
    body = match["body"]
    if "[" in body or "]" in body or "@" in body:
        raise ValueError(f"bad data spec {text!r}: cannot read the slice or sample; {_SPEC_HELP}")
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    sample = int(match["sample"]) if match["sample"] is not None else None
    if sample == 0:
        raise ValueError(f"bad data spec {text!r}: sample size must be positive")
    spec_seed = int(match["seed"]) if match["seed"] is not None else seed
    if _looks_like_path(body):
        return DataSpec(body, None, start, stop, sample, spec_seed)
    name, colon, split = body.partition(":")
    if not _NAME_RE.fullmatch(name) or (colon and not _NAME_RE.fullmatch(split)):
        raise ValueError(f"bad data spec {text!r}: {_SPEC_HELP}")
    return DataSpec(name, split or None, start, stop, sample, spec_seed)


def sample_examples(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """`n` examples drawn without replacement with random.Random(seed), in source order."""
    if not 0 <= n <= len(examples):
        raise ValueError(f"cannot sample {n} examples from {len(examples)}")
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in picked]


def load_dataset_spec(
    spec: str | DataSpec,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    field_map: Mapping[str, str] | None = None,
    sample: int | None = None,
    seed: int = 0,
    kind: AnswerKind | None = None,
) -> list[Example]:
    """Load a spec: the dataset (or file), then its slice, then a seeded sample.

    `sample`/`seed` apply when the spec itself asks for no sample; `field_map` and `kind`
    apply to files only.
    """
    if isinstance(spec, str):
        spec = parse_spec(spec, seed=seed)
    if sample is not None:
        if spec.sample is not None and spec.sample != sample:
            raise ValueError(f"spec {spec} samples {spec.sample} but sample={sample} was passed")
        if spec.sample is None:
            spec = replace(spec, sample=sample, seed=seed)
    if spec.is_file:
        examples = load_file(spec.name_or_path, field_map, kind=kind)
    else:
        if field_map is not None or kind is not None:
            raise ValueError(f"{spec}: field_map and kind apply to files, not registered datasets")
        examples = load_registered(spec.name_or_path, spec.split, data_dir)
    examples = _slice(examples, spec)
    if spec.sample is not None:
        if spec.sample > len(examples):
            raise ValueError(f"{spec}: cannot sample {spec.sample} from {len(examples)} examples")
        examples = sample_examples(examples, spec.sample, spec.seed)
    return examples


def _slice(examples: list[Example], spec: DataSpec) -> list[Example]:
    n = len(examples)
    for bound in (spec.start, spec.stop):
        if bound is not None and not -n <= bound <= n:
            raise ValueError(f"{spec}: slice bound {bound} is past the end ({n} examples)")
    return examples[spec.start : spec.stop]


# --------------------------------------------------------------------------------------------
# MetaTrain / MetaTest (paper, appendix B.1)


def make_monitor_splits(
    train: Sequence[Example],
    *,
    train_size: int | None,
    monitor_size: int,
    valid_size: int,
    seed: int,
    exclude_train_questions: bool = True,
) -> tuple[list[Example], list[Example], list[Example]]:
    """(training set, monitored training subset, validation set), following appendix B.1.

    The training set is the first `train_size` examples of `train` (all if None); the monitored
    subset ("MetaTrain") is a seeded sample of `monitor_size` of it; the validation set
    ("MetaTest") is a seeded sample of `valid_size` from the unseen remainder after
    `train_size`. With `exclude_train_questions`, remainder examples whose question text also
    occurs in the training set are not eligible (MetaMathQA repeats questions with different
    answers). Each sample is `sample_examples(..., seed)`, a fresh random.Random(seed), so
    changing one size does not change the other sample.
    """
    if train_size is not None and not 0 < train_size <= len(train):
        raise ValueError(f"train_size {train_size} is outside 1..{len(train)} (source size)")
    training = list(train[:train_size])
    remainder = list(train[len(training) :])
    if exclude_train_questions:
        seen = {ex.question for ex in training}
        remainder = [ex for ex in remainder if ex.question not in seen]
    if monitor_size > len(training):
        raise ValueError(f"monitor_size {monitor_size} exceeds the training set ({len(training)})")
    if valid_size > len(remainder):
        raise ValueError(
            f"valid_size {valid_size} exceeds the {len(remainder)} unseen examples left after the "
            f"first {len(training)} of {len(train)}"
            + (" (questions seen in training excluded)" if exclude_train_questions else "")
            + "; lower valid_size or train_size"
        )
    monitor = sample_examples(training, monitor_size, seed)
    valid = sample_examples(remainder, valid_size, seed)
    return training, monitor, valid
