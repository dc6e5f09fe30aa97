"""Dataset registry, loaders over the real local copies, specs, file loading."""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from fractions import Fraction
from functools import cache
from pathlib import Path

import pytest

from overmem.data import builtin, registry
from overmem.data.example import Example
from overmem.data.file_examples import load_file
from overmem.data.registry import register_dataset
from overmem.data.specs import DataSpec, load_dataset_spec, parse_spec, sample_examples

DATA = Path(
    os.environ.get("OVERMEM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data folder at {DATA}")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    # Tests pass data_dir explicitly; an inherited OVERMEM_DATA_DIR must not change what they test.
    monkeypatch.delenv(registry.DATA_DIR_ENV, raising=False)


@cache
def _load(spec: str) -> tuple[Example, ...]:
    return tuple(load_dataset_spec(spec, data_dir=DATA))


# ---------------------------------------------------------------------------------------------
# Registry


def test_builtin_names_are_listed():
    expected = {
        "gsm8k",
        "metamathqa",
        "gsm8k_backward",
        "math",
        "math500",
        "svamp",
        "asdiv",
        "mawps",
        "tabmwp",
        "mmlu_stem",
        "synthetic",
    }
    assert expected <= set(registry.list_datasets())


def test_unknown_name_suggests_closest():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'gsm8': did you mean 'gsm8k'\? \(known: .*svamp"
    ):
        registry.get_dataset("gsm8")
    with pytest.raises(ValueError, match=r"unknown dataset 'zzzz' \(known: "):
        load_dataset_spec("zzzz:test")


def test_register_and_load_custom_dataset(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    calls = []

    @register_dataset("toy", kind="numeric", splits=("a", "b"))
    def _toy(split, data_dir):
        calls.append((split, data_dir))
        return [Example(f"toy/{split}/{i}", f"q{i}", f"r{i}", str(i)) for i in range(10)]

    out = load_dataset_spec("toy:b[2:5]")
    assert [e.id for e in out] == ["toy/b/2", "toy/b/3", "toy/b/4"]
    assert calls == [("b", None)]
    assert registry.get_dataset("toy").splits == ("a", "b")

    def other(split, data_dir):
        return []

    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy", kind="numeric")(other)


def test_lazy_module_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(registry._LAZY_MODULES, "ghost", "overmem.data._no_such_module")
    assert "ghost" in registry.list_datasets()
    with pytest.raises(
        ValueError, match=r"'ghost' is provided by module overmem\.data\._no_such_module"
    ):
        load_dataset_spec("ghost:test")


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match=r"no split 'train' \(valid splits: test\)"):
        load_dataset_spec("svamp:train", data_dir=DATA)
    with pytest.raises(ValueError, match=r"several splits; name one \(train, test\)"):
        load_dataset_spec("gsm8k", data_dir=DATA)


def test_missing_data_dir_and_no_hub_copy(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"svamp:test: no file .*svamp/SVAMP\.json.*OVERMEM_DATA_DIR"
    ):
        load_dataset_spec("svamp:test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_spec("svamp:test", data_dir=tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Registered datasets over the real local copies

# Counts from each folder's PROVENANCE.txt.
COUNTS = [
    ("svamp:test", 1000),
    ("asdiv:test", 2215),
    ("mawps:test", 2065),
    ("tabmwp:test", 1000),
    ("tabmwp:dev", 1000),
    ("math500:test", 500),
    ("mmlu_stem:test", 3018),
    ("gsm8k_backward:test", 1270),
]
COUNTS_WITH_EXTRACTION = [("gsm8k:train", 7473), ("gsm8k:test", 1319), ("math:test", 5000)]


def _check_loaded(spec: str, count: int) -> None:
    examples = _load(spec)
    assert len(examples) == count
    name, split = spec.split(":")
    assert [e.id for e in examples] == [f"{name}/{split}/{i}" for i in range(count)]
    for e in examples:
        assert e.question.strip() and e.response.strip() and e.answer.strip(), e.id
        assert e.kind in ("numeric", "math", "choice")
        if e.kind == "numeric":
            Fraction(e.answer)  # a plain number or a/b, no units or commas
        if e.kind == "choice":
            assert e.answer in "ABCDEFGHIJ" and f"\n{e.answer}. " in e.question


@needs_data
@pytest.mark.parametrize("spec,count", COUNTS)
def test_registered_counts_and_fields(spec, count):
    _check_loaded(spec, count)


@needs_data
@pytest.mark.parametrize("spec,count", COUNTS_WITH_EXTRACTION)
def test_registered_counts_with_answer_extraction(spec, count):
    _check_loaded(spec, count)


@needs_data
def test_gsm8k_answers():
    test = _load("gsm8k:test")
    assert test[0].answer == "18"
    assert test[0].response.endswith("#### 18")
    assert test[0].question.startswith("Janet’s ducks lay 16 eggs")
    assert _load("gsm8k:train")[0].answer == "72"
    # Every answer is the number after "####" (commas dropped), checked independently here.
    for e in test:
        assert float(e.answer) == float(e.response.rsplit("####", 1)[1].replace(",", ""))


@needs_data
def test_math_answers():
    math = _load("math:test")
    assert math[0].answer == "2"
    assert math[0].meta == {"subject": "Algebra", "level": 3}
    m500 = _load("math500:test")
    assert m500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert m500[0].response.startswith("We have that $r = \\sqrt{0^2 + 3^2} = 3.$")
    assert m500[0].meta["unique_id"] == "test/precalculus/807.json"
    assert all(e.kind == "math" for e in m500)


@needs_data
def test_svamp_asdiv_mawps_answers():
    svamp = _load("svamp:test")
    assert svamp[0].question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 "
        "dollars on each pack. How much do you have to pay to buy each pack?"
    )
    assert (svamp[0].answer, svamp[0].response) == ("51", "The answer is: 51")
    assert svamp[0].meta["source_id"] == "chal-1"

    asdiv = _load("asdiv:test")
    assert asdiv[0].answer == "9" and asdiv[0].meta["answer_raw"] == "9 (apples)"
    assert asdiv[0].question == (
        "Seven red apples and two green apples are in the basket. "
        "How many apples are in the basket?"
    )
    by_raw = {e.meta["answer_raw"]: e for e in asdiv}
    assert (by_raw["3:4"].answer, by_raw["3:4"].kind) == ("3:4", "math")
    assert (by_raw["-(1/3)"].answer, by_raw["-(1/3)"].kind) == ("-(1/3)", "math")
    assert (by_raw["5/2"].answer, by_raw["5/2"].kind) == ("5/2", "numeric")
    assert by_raw["14  (seats)"].answer == "14"
    # 2,215 rows, 123 with a non-numeric answer (ratios, clock times, names; see PROVENANCE).
    assert Counter(e.kind for e in asdiv) == {"numeric": 2092, "math": 123}

    mawps = _load("mawps:test")
    assert mawps[0].answer == "43" and mawps[0].meta["source"] == "singleeq"
    assert "11.5" in {e.answer for e in mawps}  # non-integer targets keep their decimals


@needs_data
def test_tabmwp_renders_table_and_choices():
    test = _load("tabmwp:test")
    first = test[0]
    assert first.question.startswith(
        "Table: Coin collections\nName | Number of coins\nBraden | 76\n"
    )
    assert first.question.endswith(
        "\n\nSome friends discussed the sizes of their coin collections. "
        "What is the mean of the numbers?"
    )
    assert first.answer == "84" and first.response.endswith("The mean is 84.")
    money = next(e for e in test if e.meta["pid"] == "123")
    assert money.answer == "4656" and money.question.endswith("(Unit: $)")
    dev0 = _load("tabmwp:dev")[0]
    assert dev0.question.endswith("nonlinear?\nA. linear\nB. nonlinear")
    assert (dev0.answer, dev0.kind, dev0.meta["answer_text"]) == ("B", "choice", "nonlinear")
    multi = [e for e in test if e.meta["ques_type"] == "multi_choice"]
    assert len(multi) == 249 and all(e.kind == "choice" for e in multi)
    assert Counter(e.kind for e in test) == {"numeric": 751, "choice": 249}
    assert "3/10" in {e.answer for e in test}


@needs_data
def test_mmlu_letters_match_source_indices():
    mmlu = _load("mmlu_stem:test")
    # PROVENANCE: answer indices 0..3 occur 645/719/783/871 times.
    assert Counter(e.answer for e in mmlu) == {"A": 645, "B": 719, "C": 783, "D": 871}
    first = mmlu[0]
    assert first.answer == "C" and first.response == "The answer is: C"
    assert (
        "\nC. reduce the carrying capacity cif the environment to lower the K value\n"
        in first.question
    )
    assert first.meta["subject"] == "college_biology"
    assert len({e.meta["subject"] for e in mmlu}) == 18


@needs_data
def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv(registry.DATA_DIR_ENV, str(DATA))
    assert len(load_dataset_spec("svamp:test[:3]")) == 3


# ---------------------------------------------------------------------------------------------
# Hub path (no network: datasets.load_dataset is replaced)


@pytest.fixture
def fake_hub(monkeypatch):
    hf = pytest.importorskip("datasets")
    calls = []

    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return [
            {
                "question": f"{config} q?",
                "subject": config,
                "choices": ["w", "x", "y", "z"],
                "answer": len(calls) % 4,
            }
        ]

    monkeypatch.setattr(hf, "load_dataset", load_dataset)
    return calls


def test_hub_fallback_uses_same_mapping(fake_hub, tmp_path):
    examples = load_dataset_spec("mmlu_stem:test", data_dir=tmp_path)  # empty folder -> hub
    assert fake_hub == [("cais/mmlu", s, "test") for s in builtin.MMLU_STEM_SUBJECTS]
    assert len(examples) == 18
    assert examples[0].question == "abstract_algebra q?\nA. w\nB. x\nC. y\nD. z"
    assert [e.answer for e in examples[:4]] == ["B", "C", "D", "A"]
    assert examples[0].meta["subject"] == "abstract_algebra"


def test_hub_fallback_gsm8k(monkeypatch):
    hf = pytest.importorskip("datasets")
    calls = []

    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]

    monkeypatch.setattr(hf, "load_dataset", load_dataset)
    out = load_dataset_spec("gsm8k:test")  # no data_dir, no env -> hub
    assert calls == [("openai/gsm8k", "main", "test")]
    assert (out[0].id, out[0].answer) == ("gsm8k/test/0", "2")


def test_hub_failure_is_reported(monkeypatch):
    hf = pytest.importorskip("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(hf, "load_dataset", load_dataset)
    with pytest.raises(
        FileNotFoundError,
        match=r"math500:test: no file .*loading HuggingFaceH4/MATH-500 "
        r"from the hub failed \(ConnectionError: offline\)",
    ):
        load_dataset_spec("math500:test")


def test_local_metamathqa_file(tmp_path):
    rows = [
        {"query": "What is 2+3?", "response": "2+3=5\nThe answer is: 5", "type": "GSM_AnsAug"},
        {
            "query": "Simplify $\\frac{2}{4}$.",
            "response": "It is $\\frac{1}{2}$.\nThe answer is: \\frac{1}{2}",
            "type": "MATH_Rephrased",
        },
    ]
    (tmp_path / "metamathqa").mkdir()
    (tmp_path / "metamathqa" / "MetaMathQA-395K.json").write_text(json.dumps(rows))
    out = load_dataset_spec("metamathqa:train", data_dir=tmp_path)
    assert [(e.id, e.answer, e.kind) for e in out] == [
        ("metamathqa/train/0", "5", "numeric"),
        ("metamathqa/train/1", "\\frac{1}{2}", "math"),
    ]
    assert out[1].meta == {"type": "MATH_Rephrased"}


# ---------------------------------------------------------------------------------------------
# Specs, slicing, sampling


@pytest.mark.parametrize(
    "text,expected",
    [
        ("gsm8k:train[:1000]", DataSpec("gsm8k", "train", None, 1000)),
        ("gsm8k:test[100:200]", DataSpec("gsm8k", "test", 100, 200)),
        ("svamp", DataSpec("svamp", None)),
        ("synthetic:test", DataSpec("synthetic", "test")),
        ("path/to/file.jsonl", DataSpec("path/to/file.jsonl", None)),
        ("path/file.jsonl[:50]", DataSpec("path/file.jsonl", None, None, 50)),
        ("data.csv[5:]@3,seed=7", DataSpec("data.csv", None, 5, None, 3, 7)),
        ("gsm8k:test@200", DataSpec("gsm8k", "test", sample=200, seed=0)),
    ],
)
def test_parse_spec(text, expected):
    spec = parse_spec(text)
    assert spec == expected
    assert parse_spec(str(spec)) == spec  # str() round-trips


def test_parse_spec_seed_default_and_helpers():
    assert parse_spec("gsm8k:test@5", seed=9).seed == 9
    assert parse_spec("gsm8k:test@5,seed=1", seed=9).seed == 1
    spec = parse_spec("gsm8k:train[:100]@10")
    assert spec.unsliced() == DataSpec("gsm8k", "train")
    assert not spec.is_file and parse_spec("x.jsonl").is_file


@pytest.mark.parametrize(
    "bad",
    [
        "gsm8k:train[5]",
        "gsm8k:",
        "gsm8k:train[a:b]",
        "gsm8k:test@0",
        "gsm 8k:test",
        "gsm8k:test@5,seed=x",
        "",
    ],
)
def test_parse_spec_rejects(bad):
    with pytest.raises(ValueError, match="bad data spec"):
        parse_spec(bad)


@needs_data
def test_slicing_matches_python_slices():
    full = _load("svamp:test")
    assert tuple(load_dataset_spec("svamp:test[100:200]", data_dir=DATA)) == full[100:200]
    assert tuple(load_dataset_spec("svamp[:10]", data_dir=DATA)) == full[:10]
    assert tuple(load_dataset_spec("svamp:test[990:]", data_dir=DATA)) == full[990:]
    with pytest.raises(ValueError, match=r"slice bound 1001 is past the end \(1000 examples\)"):
        load_dataset_spec("svamp:test[:1001]", data_dir=DATA)
    with pytest.raises(ValueError, match=r"slice bound -1001 is past the end"):
        load_dataset_spec("svamp:test[-1001:]", data_dir=DATA)
    assert tuple(load_dataset_spec("svamp:test[-3:]", data_dir=DATA)) == full[-3:]


@needs_data
def test_sampling_is_seeded_ordered_and_within_slice():
    a = load_dataset_spec("mawps:test[:500]", data_dir=DATA, sample=50, seed=3)
    b = load_dataset_spec("mawps:test[:500]@50,seed=3", data_dir=DATA)
    c = load_dataset_spec("mawps:test[:500]", data_dir=DATA, sample=50, seed=4)
    assert a == b
    assert [e.id for e in a] != [e.id for e in c]
    index = {e.id: i for i, e in enumerate(_load("mawps:test"))}
    positions = [index[e.id] for e in a]
    assert positions == sorted(set(positions)) and len(positions) == 50  # ordered, no repeats
    assert max(positions) < 500
    # Independent check of the contract: random.Random(seed).sample over the slice positions.
    assert positions == sorted(random.Random(3).sample(range(500), 50))
    with pytest.raises(ValueError, match="cannot sample 501 from 500"):
        load_dataset_spec("mawps:test[:500]@501", data_dir=DATA)
    with pytest.raises(ValueError, match="samples 50 but sample=20"):
        load_dataset_spec("mawps:test@50", data_dir=DATA, sample=20)


def test_sample_examples_disjoint_complement():
    pool = [Example(f"x/{i}", f"q{i}", "r", "1") for i in range(30)]
    picked = sample_examples(pool, 10, seed=0)
    rest = [e for e in pool if e not in picked]
    assert len(rest) == 20 and set(e.id for e in picked).isdisjoint(e.id for e in rest)
    assert sample_examples(pool, 10, seed=0) == picked
    with pytest.raises(ValueError):
        sample_examples(pool, 31, seed=0)


# ---------------------------------------------------------------------------------------------
# Any file: layouts, field maps, errors with line numbers


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_file_gsm8k_layout_extracts_answer(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
            {"question": "Big?", "answer": "It is 1,000 + 234.\n#### 1,234"},
        ],
    )
    out = load_dataset_spec(str(path))
    assert [(e.id, e.question, e.answer, e.kind) for e in out] == [
        ("data/0", "2+2?", "4", "numeric"),
        ("data/1", "Big?", "1234", "numeric"),
    ]
    assert out[0].response == "2+2=<<2+2=4>>4\n#### 4"


def test_file_metamathqa_layout(tmp_path):
    path = _write_jsonl(
        tmp_path / "mm.jsonl", [{"query": "1+4?", "response": "1+4=5\nThe answer is: 5"}]
    )
    assert load_file(path)[0].answer == "5"


def test_file_own_layout_and_math_layout(tmp_path):
    own = _write_jsonl(tmp_path / "own.jsonl", [{"question": "q", "response": "r", "answer": 7.0}])
    assert (load_file(own)[0].answer, load_file(own)[0].kind) == ("7", "numeric")
    m500 = _write_jsonl(
        tmp_path / "m.jsonl", [{"problem": "p", "solution": "s \\boxed{x}", "answer": "x"}]
    )
    e = load_file(m500)[0]
    assert (e.question, e.response, e.answer, e.kind) == ("p", "s \\boxed{x}", "x", "math")


def test_file_json_with_field_map_and_slice(tmp_path):
    rows = [{"q": f"Q{i}?", "sol": f"work {i}", "final": i * 10, "uid": f"u{i}"} for i in range(6)]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(rows))
    fmap = {"question": "q", "response": "sol", "answer": "final", "id": "uid"}
    out = load_dataset_spec(f"{path}[1:4]", field_map=fmap)
    assert [(e.id, e.question, e.response, e.answer) for e in out] == [
        ("u1", "Q1?", "work 1", "10"),
        ("u2", "Q2?", "work 2", "20"),
        ("u3", "Q3?", "work 3", "30"),
    ]


def test_file_csv_answer_only_gets_short_reference(tmp_path):
    path = tmp_path / "probs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Problem", "Ans"])
        writer.writerow(["How many?", "1,500"])
        writer.writerow(["Ratio?", "3:4"])
    out = load_dataset_spec(str(path), field_map={"question": "Problem", "answer": "Ans"})
    assert [(e.id, e.answer, e.response) for e in out] == [
        ("probs/0", "1500", "The answer is: 1500"),
        ("probs/1", "3:4", "The answer is: 3:4"),
    ]
    chosen = load_file(path, {"question": "Problem", "answer": "Ans"}, kind="choice")
    assert chosen[0].kind == "choice" and chosen[0].answer == "1,500"


def test_file_json_object_of_objects(tmp_path):
    path = tmp_path / "keyed.json"
    path.write_text(
        json.dumps(
            {
                "a1": {"question": "q", "response": "r", "answer": "1"},
                "b2": {"question": "q2", "response": "r2", "answer": "2"},
            }
        )
    )
    assert [e.answer for e in load_file(path)] == ["1", "2"]


def test_file_error_invalid_json_line(tmp_path):
    good = {"question": "q", "response": "r", "answer": "1"}
    path = _write_jsonl(
        tmp_path / "data.jsonl", [good, good, "", good, good, good, '{"question": "q",']
    )
    with pytest.raises(ValueError, match=r"data\.jsonl line 7: invalid JSON \("):
        load_file(path)


def test_file_error_missing_field_names_line(tmp_path):
    good = {"question": "q", "response": "r", "answer": "1"}
    path = _write_jsonl(
        tmp_path / "data.jsonl", [good, good, {"prompt": "q", "response": "r", "answer": "1"}]
    )
    with pytest.raises(
        ValueError,
        match=r"data\.jsonl line 3: missing field 'question' \(fields present: "
        r"prompt, response, answer\); set a field mapping",
    ):
        load_file(path)


def test_file_error_no_layout(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": "q", "completion": "r"}])
    with pytest.raises(
        ValueError,
        match=r"data\.jsonl line 1: missing field 'question' \(fields present: "
        r"prompt, completion\)",
    ):
        load_file(path)
    with pytest.raises(ValueError, match="field map keys"):
        load_file(path, {"question": "prompt", "solution": "completion"})
    with pytest.raises(ValueError, match="at least one of 'response', 'answer'"):
        load_file(path, {"question": "prompt"})
    out = load_file(path, {"question": "prompt", "response": "completion", "answer": "completion"})
    assert out[0].answer == "r"


def test_file_error_unparseable_answer(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"question": "a", "answer": "1+1=2\n#### 2"},
            {"question": "b", "answer": "no final answer here"},
        ],
    )
    with pytest.raises(
        ValueError,
        match=r"data\.jsonl line 2: no final answer found in field 'answer' "
        r".*map it: field_map=",
    ):
        load_file(path)


def test_file_error_csv_line_and_json_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("question,answer_text\nq1,1\n,2\n")
    with pytest.raises(ValueError, match=r"t\.csv line 3: empty question"):
        load_file(path, {"question": "question", "answer": "answer_text"})
    bad = tmp_path / "b.json"
    bad.write_text('[\n {"question": "q"},\n {"question": }\n]')
    with pytest.raises(ValueError, match=r"b\.json line 3: invalid JSON"):
        load_file(bad)
    lines = tmp_path / "l.json"
    lines.write_text('{"question": "q"}\n{"question": "r"}\n')
    with pytest.raises(ValueError, match="rename it to .jsonl"):
        load_file(lines)


def test_file_errors_other(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_spec(str(tmp_path / "missing.jsonl"))
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_file(txt)
    with pytest.raises(ValueError, match="apply to files"):
        load_dataset_spec("svamp:test", field_map={"question": "q", "answer": "a"})
