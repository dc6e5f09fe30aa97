"""Code examples: the program of a generation, the datasets, and accuracy by running tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overmem.config import EvalConfig, GenerationConfig
from overmem.data.answers import extract_answer, is_correct
from overmem.data.code import can_check, extract_program
from overmem.data.specs import load_dataset_spec
from overmem.dynamics import evaluate_examples, split_summary
from overmem.generation import Continuation
from tests.conftest import DATA_DIR, fixed_continuation

PROMPT = "import math\n\n\ndef area(r: float) -> float:\n    \"\"\"Area of a circle of radius r.\"\"\"\n"


@pytest.mark.parametrize(("generation", "program"), [
    # bare completion: the prompt, then the text up to the first HumanEval stop sequence
    ("    return math.pi * r * r\n\nprint(area(2))\n", PROMPT + "    return math.pi * r * r\n"),
    ("    return math.pi * r * r\n# done\n", PROMPT + "    return math.pi * r * r"),
    # whole function, unfenced: prose before and after dropped; the prompt kept for its import
    ("Here it is:\ndef area(r):\n    return math.pi * r ** 2\n\nThat is all.",
     PROMPT + "\ndef area(r):\n    return math.pi * r ** 2\n"),
    # fenced: the block with the entry point, even when an untagged block comes first
    ("```\n$ python\n```\n```python\ndef area(r):\n    return 3.14159 * r * r\n```\nDone.",
     PROMPT + "\ndef area(r):\n    return 3.14159 * r * r\n"),
    # an unclosed fence (cut off by the generation limit) runs to the end
    ("```python\n    return math.pi * r * r", PROMPT + "    return math.pi * r * r"),
    ("", None),
    ("```python\n   \n```", None),
])
def test_extract_program(generation, program):
    assert extract_program(generation, PROMPT, "area") == program


def test_extract_program_without_a_prompt():
    answer = "You can do it like this:\n\n```python\ndef f(x):\n    return x + 1\n```\n\nThe function adds one."
    assert extract_program(answer) == "def f(x):\n    return x + 1\n"
    assert extract_answer(answer, "code") == "def f(x):\n    return x + 1\n"  # answers.py hands code over
    with pytest.raises(ValueError, match="running its tests"):
        is_correct(answer, "def f(x): ...", "code")


@pytest.mark.skipif(not (DATA_DIR / "humaneval" / "HumanEval.jsonl").is_file(), reason="no HumanEval file")
def test_humaneval_examples_from_the_real_file():
    examples = load_dataset_spec("humaneval", data_dir=DATA_DIR)
    first = json.loads((DATA_DIR / "humaneval" / "HumanEval.jsonl").read_text().splitlines()[0])
    assert len(examples) == 164 and len({e.id for e in examples}) == 164
    ex = examples[0]
    assert ex.id == "HumanEval/0" and ex.kind == "code" and can_check(ex)
    assert ex.response == "```python\n" + (first["prompt"] + first["canonical_solution"]).rstrip() + "\n```"
    assert ex.answer == first["prompt"] + first["canonical_solution"]
    assert ex.meta == {"prompt": first["prompt"], "test": first["test"], "entry_point": "has_close_elements"}
    assert first["prompt"] in ex.question and ex.question.startswith("Complete the following Python function")


def _codefeedback_rows(n: int) -> list[dict]:
    return [{"query": f"Write a function that returns {i}.",
             "answer": f"Sure:\n\n```python\ndef f():\n    return {i}\n```\n\nIt returns {i}."} for i in range(n)]


def test_codefeedback_file_and_registered_name(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _codefeedback_rows(3)))
    from_file = load_dataset_spec(str(path))  # the query/answer layout is recognised as code
    assert [e.kind for e in from_file] == ["code"] * 3
    assert from_file[1].question == "Write a function that returns 1."
    assert from_file[1].response == _codefeedback_rows(3)[1]["answer"]
    assert from_file[1].answer == "def f():\n    return 1\n" and not can_check(from_file[1])
    folder = tmp_path / "data" / "codefeedback"
    folder.mkdir(parents=True)
    (folder / "CodeFeedback-Filtered-Instruction.jsonl").write_text(path.read_text())
    registered = load_dataset_spec("codefeedback:train[:2]", data_dir=tmp_path / "data")
    assert [e.id for e in registered] == ["codefeedback/train/0", "codefeedback/train/1"]
    assert [(e.question, e.response, e.answer) for e in registered] == [
        (e.question, e.response, e.answer) for e in from_file[:2]]


def test_accuracy_of_code_comes_from_the_sandbox(tiny_model_dir, char_tokenizer, tmp_path, monkeypatch):
    """Three problems with tests (two answered right, one wrong) and one without: 2/3, and the
    untested example is neither generated for nor counted."""
    from transformers import AutoModelForCausalLM

    import overmem.dynamics as dynamics
    from overmem.data.code import code_response_example

    problems = [{"task_id": f"T/{i}", "entry_point": "f", "prompt": f"def f(x):\n    \"\"\"x + {i}\"\"\"\n",
                 "canonical_solution": f"    return x + {i}\n",
                 "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n"} for i in range(3)]
    folder = tmp_path / "humaneval"
    folder.mkdir()
    (folder / "HumanEval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    examples = load_dataset_spec("humaneval", data_dir=tmp_path)
    untested = code_response_example("Write f.", "```python\ndef f(x):\n    return x\n```", "cf/0")
    answers = {"T/0": "    return x + 0\n", "T/1": "```python\ndef f(x):\n    return x + 1\n```",
               "T/2": "    return x\n"}
    prompts_seen = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        prompts_seen.extend(prompts)
        return [Continuation([], answers[next(e.id for e in examples if e.question in p)]) for p in prompts]

    monkeypatch.setattr(dynamics, "generate_greedy", fake_generate)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eval_cfg = EvalConfig(bootstrap=100)
    rows = evaluate_examples(model, char_tokenizer, [*examples, untested], eval_cfg=eval_cfg,
                             gen_cfg=GenerationConfig(max_new_tokens=4), max_length=512, quiet=True)
    assert len(prompts_seen) == 3
    assert [r.get("correct") for r in rows] == [True, True, False, None]
    assert rows[2]["failure"] == "AssertionError" and rows[0]["failure"] is None and rows[0]["sandbox"]
    assert rows[1]["extracted"] == problems[1]["prompt"] + "\ndef f(x):\n    return x + 1\n"
    assert all(r["ppl"] > 1 for r in rows)  # the references are scored as any other
    summary = split_summary(rows, eval_cfg)
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["n_unchecked"] == 1


def test_a_comment_line_of_hashes_does_not_end_a_program(char_tokenizer, tiny_model_dir, tmp_path):
    """`#### ...` ends a math answer, not a program: a completion holding such a comment runs whole."""
    from transformers import AutoModelForCausalLM

    _fake_humaneval(tmp_path, 1)
    (example,) = load_dataset_spec("humaneval", data_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fixed_continuation(model, char_tokenizer, "    #### the easy case\n    return x\n")
    (row,) = evaluate_examples(model, char_tokenizer, [example], eval_cfg=EvalConfig(bootstrap=100),
                               gen_cfg=GenerationConfig(max_new_tokens=64), max_length=512, quiet=True)
    assert row["generation"] == "    #### the easy case\n    return x\n"
    assert row["correct"] is True, row["failure"]


ROOT = Path(__file__).resolve().parents[1]


def _fake_humaneval(folder: Path, n: int) -> None:
    (folder / "humaneval").mkdir(parents=True)
    rows = [{"task_id": f"HumanEval/{i}", "entry_point": "f", "prompt": "def f(x):\n    \"\"\"x\"\"\"\n",
             "canonical_solution": "    return x\n", "test": "def check(c):\n    assert c(1) == 1\n"} for i in range(n)]
    (folder / "humaneval" / "HumanEval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_code_example_configs_resolve(tmp_path, monkeypatch):
    """examples/code/smollm2.yaml loads its data (the shipped CodeFeedback-format file, HumanEval
    from a data folder); examples/paper/code.yaml names code datasets with Table 6's settings."""
    from overmem.cli_inputs import check_tracked_splits
    from overmem.config import load_config
    from overmem.data.registry import get_dataset
    from overmem.data.specs import parse_spec
    from overmem.data.splits import derive_splits

    _fake_humaneval(tmp_path, 20)
    monkeypatch.chdir(ROOT)  # the example's training file is relative to the repository root
    cfg = load_config(ROOT / "examples" / "code" / "smollm2.yaml", [f"data.data_dir={tmp_path}"])
    check_tracked_splits(cfg)
    splits = derive_splits(cfg.data)
    assert len(splits.train) == 32 and all(e.kind == "code" and not can_check(e) for e in splits.train)
    assert {k: len(v) for k, v in splits.tracked.items()} == {"train": 16, "validation": 8, "humaneval": 16}
    assert all(can_check(e) for e in splits.tracked["humaneval"])
    # Every reference program of the shipped file is valid Python.
    for ex in load_dataset_spec("examples/code/codefeedback_sample.jsonl"):
        compile(ex.answer, ex.id, "exec")

    paper = load_config(ROOT / "examples" / "paper" / "code.yaml", [])
    assert (paper.train.method, paper.train.lr, paper.train.batch_size, paper.train.warmup_steps,
            paper.train.epochs) == ("lora", 2e-4, 128, 100, 10)
    for text in (paper.data.train, paper.data.validation, *paper.data.tests.values()):
        spec = parse_spec(text)
        assert get_dataset(spec.name_or_path).kind == "code"
    assert parse_spec(paper.data.train).stop == 10000


def test_sampled_code_is_checked_and_gives_pass_at_k(tmp_path):
    """The sampling analyses' check runs every sampled program; pass@k comes from those results
    (problem 0: 2 of 3 samples pass, problem 1: none; pass@1 = (2/3 + 0) / 2, pass@3 = 1/2)."""
    from overmem.analysis.diversity import pass_at_k_curve
    from overmem.analysis.sampling import check

    _fake_humaneval(tmp_path, 2)
    examples = load_dataset_spec("humaneval", data_dir=tmp_path)
    toy = load_dataset_spec(str(_toy_file(tmp_path)))
    texts = [["    return x\n", "    return 0\n", "```python\ndef f(x):\n    return x\n```"],
             ["    return 2\n", "", "    return -x\n"], ["#### 5"]]
    rows = check([*examples, toy[0]], texts)
    correct = [[r["correct"] for r in per_query] for per_query in rows]
    assert correct == [[True, False, True], [False, False, False], [True]]
    assert rows[0][1]["failure"] == "AssertionError" and rows[1][1]["failure"] == "no code in the generation"
    assert pass_at_k_curve(correct[:2], [1, 3]) == pytest.approx({1: (2 / 3 + 0) / 2, 3: 0.5})


def _toy_file(folder: Path) -> Path:
    path = folder / "toy.jsonl"
    path.write_text(json.dumps({"question": "2 + 3?", "response": "#### 5", "answer": "5"}) + "\n")
    return path
