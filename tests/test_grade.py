"""`overmem grade`: generations from anywhere, checked by overmem's rules and, for code, the sandbox.

The HumanEval checks use the real file (skipped when the data folder is absent): all 164 canonical
solutions pass and 164 wrong ones (each body replaced by `return None`) fail, in the three forms a
generation takes (a bare completion, a whole function, a fenced block in a chat answer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from overmem.cli import main
from tests.conftest import DATA_DIR, toy_examples

HUMANEVAL = DATA_DIR / "humaneval" / "HumanEval.jsonl"
needs_humaneval = pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"no HumanEval file at {HUMANEVAL}")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _forms(problem: dict, body: str, i: int) -> str:
    """Generation i of a problem in one of three forms: bare completion, whole function, fenced."""
    whole = problem["prompt"] + body
    return (body, whole, f"Here is the function:\n```python\n{whole}```\nIt handles the examples.")[i % 3]


def _bootstrap(values: list[float], n_boot: int = 1000, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap written out again: resample with numpy's generator seeded 0."""
    x = np.array(values)
    idx = np.random.default_rng(0).integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    return float(np.quantile(means, (1 - confidence) / 2)), float(np.quantile(means, 1 - (1 - confidence) / 2))


@pytest.mark.slow
@needs_humaneval
def test_humaneval_canonical_pass_and_wrong_fail(tmp_path, capsys):
    problems = [json.loads(line) for line in HUMANEVAL.read_text().splitlines()]
    assert len(problems) == 164
    right = [{"id": p["task_id"], "generation": _forms(p, p["canonical_solution"], i)} for i, p in enumerate(problems)]
    # Wrong ones in reverse order: matched by id, not by position.
    wrong = [{"id": p["task_id"], "generation": _forms(p, "    return None\n", i)}
             for i, p in enumerate(problems)][::-1]
    seconds = {}
    for name, rows in (("right", right), ("wrong", wrong)):
        t0 = time.perf_counter()
        assert main(["grade", "--data", "humaneval", "--data-dir", str(DATA_DIR), "--generations",
                     str(_write_jsonl(tmp_path / f"{name}.jsonl", rows)), "--out", str(tmp_path / f"{name}.json")]) == 0
        seconds[name] = time.perf_counter() - t0
    print(f"grade 164 canonical: {seconds['right']:.1f} s, 164 wrong: {seconds['wrong']:.1f} s")
    result = json.loads((tmp_path / "right.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "right.samples.jsonl").read_text().splitlines()]
    assert result["n"] == 164 and result["n_correct"] == 164 and result["accuracy"] == 1.0
    assert all(s["correct"] and s["status"] == "passed" and s["failure"] is None for s in samples)
    assert [s["id"] for s in samples] == [p["task_id"] for p in problems]
    assert result["sandbox"]["isolation"]
    result = json.loads((tmp_path / "wrong.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "wrong.samples.jsonl").read_text().splitlines()]
    assert result["n_correct"] == 0 and result["accuracy"] == 0.0
    assert result["accuracy_ci_low"] == 0.0 and result["accuracy_ci_high"] == 0.0
    for s in samples:  # every one fails on its tests, with the reason
        assert not s["correct"] and s["status"] in ("failed", "error") and s["failure"]


def _toy_data(tmp_path: Path, n: int = 8) -> tuple[Path, list]:
    examples = toy_examples(n)
    path = _write_jsonl(tmp_path / "toy.jsonl", [{"question": e.question, "response": e.response, "answer": e.answer}
                                                  for e in examples])
    return path, examples


def test_numeric_generations_by_order_and_by_id(tmp_path, capsys):
    data, examples = _toy_data(tmp_path)
    # Hand-made: 5 of 8 right, in three answer styles; 3 wrong or without an answer.
    texts = [f"So the total is {e.answer}.\n#### {e.answer}" for e in examples[:3]]
    texts += [f"The answer is {examples[3].answer}", f"\\boxed{{{examples[4].answer}}}"]
    texts += [f"#### {int(examples[5].answer) + 1}", "I do not know.", "#### 1,000"]
    gens = _write_jsonl(tmp_path / "gens.jsonl", [{"generation": t} for t in texts])
    out = tmp_path / "res" / "grades.json"
    assert main(["grade", "--data", str(data), "--generations", str(gens), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    samples = [json.loads(line) for line in out.with_name("grades.samples.jsonl").read_text().splitlines()]
    expected = [True] * 5 + [False] * 3
    assert [s["correct"] for s in samples] == expected
    assert samples[6]["extracted"] is None and samples[7]["extracted"] == "1000"
    assert result["n"] == 8 and result["n_correct"] == 5 and result["accuracy"] == 5 / 8
    interval = (result["accuracy_ci_low"], result["accuracy_ci_high"])
    assert interval == pytest.approx(_bootstrap([float(c) for c in expected]))
    assert "sandbox" not in result
    # The same generations keyed by id, shuffled, give the same rows.
    keyed = [{"id": e.id, "generation": t} for e, t in zip(examples, texts)][::-1]
    out2 = tmp_path / "by_id.json"
    assert main(["grade", "--data", str(data), "--generations", str(_write_jsonl(tmp_path / "k.jsonl", keyed)),
                 "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["n_correct"] == 5
    assert out2.with_name("by_id.samples.jsonl").read_text() == out.with_name("grades.samples.jsonl").read_text()
    assert "accuracy=0.6250" in capsys.readouterr().out


@pytest.mark.parametrize(("lines", "fragment"), [
    (['{"generation": "#### 5"}'] * 7, "7 generations but"),
    (['{"generation": "#### 5"}'] * 7 + ["{not json"], "line 8: invalid JSON"),
    (['{"generation": "#### 5"}'] * 3 + ['{"text": "#### 5"}'] + ['{"generation": "#### 5"}'] * 4,
     "line 4: field 'generation' is missing"),
    (['{"generation": 5}'] + ['{"generation": "#### 5"}'] * 7, "line 1: field 'generation' is a int"),
    (['{"id": "toy/0", "generation": "#### 5"}', '{"generation": "#### 5"}'], "line 2: no 'id'"),
    ([json.dumps({"id": f"toy/{i}", "generation": "#### 5"}) for i in range(7)]
     + ['{"id": "toy/99", "generation": ""}'],
     "line 8: id 'toy/99' is not an example"),
    ([json.dumps({"id": f"toy/{i}", "generation": "#### 5"}) for i in range(7)] + ['{"id": "toy/3", "generation": ""}'],
     "line 8: id 'toy/3' repeats line 4"),
    ([json.dumps({"id": f"toy/{i}", "generation": "#### 5"}) for i in range(6)], "no generation for 2 of the 8"),
    (["[1, 2]"], "line 1: expected a JSON object"),
    ([], "no generations"),
])
def test_bad_generations_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, lines, fragment):
    data, _ = _toy_data(tmp_path)
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out" / "grades.json"
    assert main(["grade", "--data", str(data), "--generations", str(gens), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    if lines and fragment not in ("no generations",):
        assert str(gens) in err
    assert not out.parent.exists()


def test_missing_generations_file_is_exit_2(tmp_path, capsys):
    data, _ = _toy_data(tmp_path)
    assert main(["grade", "--data", str(data), "--generations", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "g.json")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


def _code_problem(tmp_path: Path) -> Path:
    """A HumanEval-format file of two problems (a helper in the prompt of the second)."""
    rows = [
        {"task_id": "T/0", "entry_point": "add",
         "prompt": "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
         "canonical_solution": "    return sum(xs)\n",
         "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"},
        {"task_id": "T/1", "entry_point": "twice",
         "prompt": "def helper(x):\n    return 2 * x\n\n\n"
                   "def twice(x: int) -> int:\n    \"\"\"2x, with helper.\"\"\"\n",
         "canonical_solution": "    return helper(x)\n",
         "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
    ]
    folder = tmp_path / "data" / "humaneval"
    folder.mkdir(parents=True)
    return _write_jsonl(folder / "HumanEval.jsonl", rows).parent.parent


@pytest.mark.parametrize(("generations", "passed"), [
    # bare completions: appended to the prompt; the rambling after the body is cut at "\ndef"
    (["    return sum(xs)\n", "    return helper(x)\n\ndef unrelated():\n    return 1/0\n"], [True, True]),
    # whole functions, unfenced, with prose around; the prompt's imports and helpers are kept
    (["Sure.\ndef add(xs: List[int]) -> int:\n    return sum(xs)\nThis sums the list.",
      "def twice(x):\n    return helper(x)\n"], [True, True]),
    # chat answers with fenced blocks: the block that defines the entry point wins
    (["```bash\npip install nothing\n```\n```python\ndef add(xs):\n    total = 0\n    for x in xs:\n"
      "        total += x\n    return total\n```", "```python\ndef twice(x):\n    return x + x"], [True, True]),
    # wrong: a wrong body, a fenced wrong function, no code at all
    (["    return 0\n", "```python\n```"], [False, False]),
])
def test_code_generation_forms(tmp_path, generations, passed):
    data_dir = _code_problem(tmp_path)
    gens = _write_jsonl(tmp_path / "g.jsonl", [{"id": f"T/{i}", "generation": g} for i, g in enumerate(generations)])
    out = tmp_path / "g.json"
    assert main(["grade", "--data", "humaneval", "--data-dir", str(data_dir), "--generations", str(gens),
                 "--out", str(out), "--workers", "2"]) == 0
    samples = [json.loads(line) for line in out.with_name("g.samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == passed
    if passed == [False, False]:
        assert samples[0]["status"] == "failed" and samples[0]["failure"].startswith("AssertionError")
        assert samples[1]["status"] == "no_code" and samples[1]["extracted"] is None
