"""GPQA from a CSV in the authors' layout: seeded choice shuffling, the paper's 300 / rest split,
the explanation as the scored response, bad rows, and `overmem evaluate` on it with a tiny model."""

import csv
import json
import math
import random

import pytest
import torch

from overmem.cli import main
from overmem.data.answers import is_correct, reference_answer
from overmem.data.registry import load_registered
from overmem.data.specs import load_dataset_spec
from overmem.results import read_jsonl

# The authors' CSV has more columns; these are the ones read (plus a few that are not).
HEADER = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
          "Incorrect Answer 3", "Explanation", "Record ID", "High-level domain", "Subdomain"]


def gpqa_row(i):
    return {"Pre-Revision Question": "old", "Question": f"What is {i} + 1?", "Correct Answer": f"{i + 1}",
            "Incorrect Answer 1": f"{i + 2}", "Incorrect Answer 2": f"{i + 3}", "Incorrect Answer 3": f"{i}",
            "Explanation": f"Adding one to {i} gives {i + 1}.", "Record ID": f"rec{i:04d}",
            "High-level domain": "Physics", "Subdomain": "Arithmetic"}


def write_gpqa(path, rows, header=HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def gpqa_dir(tmp_path):
    """A data folder with a 310-row gpqa_main.csv and a 5-row gpqa_diamond.csv."""
    write_gpqa(tmp_path / "data" / "gpqa" / "gpqa_main.csv", [gpqa_row(i) for i in range(310)])
    write_gpqa(tmp_path / "data" / "gpqa" / "gpqa_diamond.csv", [gpqa_row(i) for i in range(5)])
    return tmp_path / "data"


def test_paper_split_300_train_rest_test(gpqa_dir):
    train = load_registered("gpqa", "train", gpqa_dir)
    test = load_registered("gpqa", "test", gpqa_dir)
    assert (len(train), len(test)) == (300, 10)
    # Independently: shuffle the 310 row indices with random.Random(0); the first 300 are training rows.
    order = list(range(310))
    random.Random(0).shuffle(order)
    assert [ex.id for ex in train] == [f"gpqa/train/{i}" for i in sorted(order[:300])]
    assert [ex.id for ex in test] == [f"gpqa/test/{i}" for i in sorted(order[300:])]
    # Each test example is the row its id names.
    for ex in test:
        i = int(ex.id.rsplit("/", 1)[1])
        assert ex.question.startswith(f"What is {i} + 1?\n") and ex.meta["record_id"] == f"rec{i:04d}"
    assert [ex.id for ex in load_registered("gpqa", "test", gpqa_dir)] == [ex.id for ex in test]  # deterministic


def test_choices_shuffled_per_example_and_recorded(gpqa_dir):
    examples = load_registered("gpqa", "train", gpqa_dir) + load_registered("gpqa", "test", gpqa_dir)
    letters = []
    for ex in examples:
        i = int(ex.id.rsplit("/", 1)[1])
        row = gpqa_row(i)
        columns = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
        order = ex.meta["choice_order"]
        assert sorted(order) == [0, 1, 2, 3] and ex.meta["seed"] == 0
        # The lettered lines of the question, read back, are the columns in the recorded order.
        lines = ex.question.split("\n")[1:]
        assert lines == [f"{'ABCD'[k]}. {row[columns[order[k]]]}" for k in range(4)]
        assert ex.meta["choices"] == [row[columns[c]] for c in order]
        # The answer letter is the line holding the correct answer.
        assert lines["ABCD".index(ex.answer)] == f"{ex.answer}. {i + 1}"
        # The order is random.Random("0:<Record ID>") shuffling [0, 1, 2, 3].
        expected = [0, 1, 2, 3]
        random.Random(f"0:rec{i:04d}").shuffle(expected)
        assert order == expected
        letters.append(ex.answer)
    counts = {letter: letters.count(letter) for letter in "ABCD"}
    assert all(50 <= c <= 105 for c in counts.values()), counts  # about 310 / 4 each, not all "A"


def test_order_depends_on_the_example_only(gpqa_dir, tmp_path):
    """The same record gets the same order in another file, whatever rows surround it."""
    whole = {ex.meta["record_id"]: ex for ex in load_registered("gpqa_diamond", "test", gpqa_dir)}
    other = write_gpqa(tmp_path / "other" / "gpqa" / "gpqa_diamond.csv", [gpqa_row(i) for i in (4, 2)])
    for ex in load_registered("gpqa_diamond", "test", other.parents[1]):
        assert ex.meta["choice_order"] == whole[ex.meta["record_id"]].meta["choice_order"]
        assert ex.question == whole[ex.meta["record_id"]].question


def test_response_is_the_explanation_ending_in_the_letter(gpqa_dir):
    examples = load_registered("gpqa_diamond", "test", gpqa_dir)
    assert [ex.id for ex in examples] == [f"gpqa_diamond/test/{i}" for i in range(5)]
    for i, ex in enumerate(examples):
        assert ex.kind == "choice"
        assert ex.response == f"Adding one to {i} gives {i + 1}.\nThe answer is ({ex.answer})."
        assert reference_answer(ex.response, "choice") == ex.answer
        assert is_correct(ex.response, ex.answer, "choice") == (ex.answer, True)
        wrong = "ABCD"[("ABCD".index(ex.answer) + 1) % 4]
        assert is_correct(f"I think the answer is ({wrong}).", ex.answer, "choice") == (wrong, False)
        assert ex.meta["domain"] == "Physics"


def test_too_few_rows_for_the_paper_split(gpqa_dir):
    write_gpqa(gpqa_dir / "gpqa" / "gpqa_main.csv", [gpqa_row(i) for i in range(5)])
    with pytest.raises(ValueError, match="5 rows; the paper's split needs more than 300"):
        load_registered("gpqa", "train", gpqa_dir)


@pytest.mark.parametrize(("change", "message"), [
    (lambda header, rows: ([h for h in header if h != "Incorrect Answer 2"], rows),
     r"gpqa_main\.csv line 2: missing column 'Incorrect Answer 2'"),
    (lambda header, rows: (header, [*rows[:3], {**rows[3], "Correct Answer": "  "}, *rows[4:]]),
     r"gpqa_main\.csv line 5: empty column 'Correct Answer'"),
    (lambda header, rows: (header, [*rows[:7], {**rows[7], "Explanation": ""}, *rows[8:]]),
     r"gpqa_main\.csv line 9: empty column 'Explanation'"),
])
def test_bad_rows_name_file_line_and_column(tmp_path, change, message):
    header, rows = change(HEADER, [gpqa_row(i) for i in range(310)])
    write_gpqa(tmp_path / "gpqa" / "gpqa_main.csv", rows, header)
    # Both splits read every row, so a bad row fails either.
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=message):
            load_registered("gpqa", split, tmp_path)


def test_hub_copy_and_missing_file(tmp_path, monkeypatch):
    hf = pytest.importorskip("datasets")
    calls = []

    def gated(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        raise ConnectionError("gated dataset: accept the conditions on the hub")

    monkeypatch.setattr(hf, "load_dataset", gated)
    with pytest.raises(FileNotFoundError, match=r"no file .*gpqa/gpqa_main\.csv.*Idavidrein/gpqa.*gated"):
        load_registered("gpqa", "test", tmp_path)
    assert calls == [("Idavidrein/gpqa", "gpqa_main", "train")]  # the hub copy: one split holding every row

    monkeypatch.setattr(hf, "load_dataset", lambda hub_id, config=None, split=None: [gpqa_row(i) for i in range(3)])
    hub = load_registered("gpqa_diamond", "test", tmp_path)
    write_gpqa(tmp_path / "gpqa" / "gpqa_diamond.csv", [gpqa_row(i) for i in range(3)])
    local = load_registered("gpqa_diamond", "test", tmp_path)
    assert hub == local  # the same mapping on both paths


def test_evaluate_on_gpqa_with_a_tiny_model(gpqa_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gpqa.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", "gpqa:test[:4]", "--data-dir", str(gpqa_dir),
                 "--out", str(out), "-q", "--set", "generation.max_new_tokens=6", "--set", "eval.bootstrap=200"]) == 0
    row = json.loads(out.read_text())
    samples = read_jsonl(tmp_path / "gpqa.samples.jsonl")
    examples = load_dataset_spec("gpqa:test[:4]", data_dir=gpqa_dir)
    assert row["n"] == len(samples) == 4 and [s["id"] for s in samples] == [ex.id for ex in examples]
    # Accuracy: each greedy generation re-checked here as a choice letter.
    correct = [is_correct(s["generation"], ex.answer, "choice")[1] for s, ex in zip(samples, examples)]
    assert [s["correct"] for s in samples] == correct
    assert row["accuracy"] == pytest.approx(sum(correct) / 4)
    assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
    # Perplexity of the first reference chain, computed here with a plain forward pass.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overmem.data.example import format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ex = examples[0]
    p_ids = tok(format_prompt(ex.question))["input_ids"]
    r_ids = tok(ex.response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + r_ids])).logits[0].double()
    logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], dim=-1)
    nll = -logp[torch.arange(len(r_ids)), torch.tensor(r_ids)].mean().item()
    assert samples[0]["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert row["ppl"] == pytest.approx(sum(s["ppl"] for s in samples) / 4, rel=1e-9)
    assert "gpqa:test[:4]: n=4" in capsys.readouterr().out


def test_paper_config_splits(gpqa_dir):
    """examples/paper/gpqa.yaml: 300 training questions, the rest tracked as validation and test."""
    from pathlib import Path

    from overmem.config import load_config
    from overmem.data.splits import derive_splits

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "paper" / "gpqa.yaml",
                      [f"data.data_dir={gpqa_dir}"])
    assert (cfg.model.name_or_path, cfg.train.method, cfg.train.batch_size, cfg.train.epochs) == (
        "meta-llama/Llama-3.1-8B", "lora", 128, 10)
    splits = derive_splits(cfg.data)
    test_ids = [ex.id for ex in load_registered("gpqa", "test", gpqa_dir)]
    assert len(splits.train) == 300 and len(splits.tracked["train"]) == 300
    assert [ex.id for ex in splits.tracked["validation"]] == [ex.id for ex in splits.tracked["gpqa"]] == test_ids


def test_explanations_that_state_an_answer_first_are_reported(tmp_path, caplog):
    rows = [gpqa_row(i) for i in range(3)]
    rows[1]["Explanation"] = "The answer is D-glucose, the sugar."  # the choice rule reads "D" here
    write_gpqa(tmp_path / "gpqa" / "gpqa_diamond.csv", rows)
    with caplog.at_level("WARNING", logger="overmem.data.gpqa"):
        examples = load_registered("gpqa_diamond", "test", tmp_path)
    assert examples[1].answer == "C"  # random.Random("0:rec0001") puts the correct answer third
    assert [ex.id for ex in examples if reference_answer(ex.response, "choice") != ex.answer] == ["gpqa_diamond/test/1"]
    assert "1 reference(s) read by the choice rule as another letter" in caplog.text
    assert "gpqa_diamond/test/1" in caplog.text


def test_a_gpqa_csv_given_by_path(gpqa_dir):
    path = gpqa_dir / "gpqa" / "gpqa_diamond.csv"
    examples = load_dataset_spec(f"{path}[:3]")
    registered = load_registered("gpqa_diamond", "test", gpqa_dir)[:3]
    assert [ex.id for ex in examples] == ["gpqa_diamond/0", "gpqa_diamond/1", "gpqa_diamond/2"]
    assert [(ex.question, ex.response, ex.answer, ex.kind) for ex in examples] == [
        (ex.question, ex.response, ex.answer, ex.kind) for ex in registered]
