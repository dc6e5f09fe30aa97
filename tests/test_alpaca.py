"""Open-ended instruction data (Alpaca format): loading, the "open" answer kind (perplexity
tracked, accuracy null), `overmem evaluate` on such a file, and a tiny run with its phases,
figure and checkpoint selection when no accuracy exists."""

import json

import pytest

from overmem.cli import main
from overmem.config import EvalConfig, GenerationConfig
from overmem.data.registry import load_registered
from overmem.data.specs import load_dataset_spec
from overmem.dynamics import evaluate_examples, split_summary
from overmem.results import read_jsonl
from tests.conftest import toy_examples


def alpaca_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        row = {"instruction": f"Name the number after {i}.", "input": "" if i % 2 else f"Count from {i}.",
               "output": f"The number after {i} is {i + 1}."}
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_files_in_alpaca_format(tmp_path):
    rows = alpaca_rows(4)
    for path in (write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "a.json"):
        if path.suffix == ".json":
            path.write_text(json.dumps(rows))
        examples = load_dataset_spec(str(path))
        assert [ex.id for ex in examples] == [f"a/{i}" for i in range(4)]
        assert all(ex.kind == "open" for ex in examples)
        assert examples[0].question == "Name the number after 0.\n\nCount from 0."  # input after a blank line
        assert examples[1].question == "Name the number after 1."  # no input
        assert examples[1].response == examples[1].answer == "The number after 1 is 2."
        assert examples[0].meta == {"instruction": "Name the number after 0.", "input": "Count from 0."}


def test_registered_alpaca_cleaned_from_the_data_folder(tmp_path):
    (tmp_path / "alpaca_cleaned").mkdir()
    (tmp_path / "alpaca_cleaned" / "alpaca_data_cleaned.json").write_text(json.dumps(alpaca_rows(3)))
    examples = load_registered("alpaca_cleaned", "train", tmp_path)
    assert [ex.id for ex in examples] == [f"alpaca_cleaned/train/{i}" for i in range(3)]
    assert examples[2].response == "The number after 2 is 3."


@pytest.mark.parametrize(("row", "message"), [
    ({"instruction": "Say hi.", "input": "", "output": "  "}, r"bad\.jsonl line 2: empty field 'output'"),
    ({"instruction": "Say hi.", "input": "", "output": None}, r"bad\.jsonl line 2: missing field 'output'"),
])
def test_bad_alpaca_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [alpaca_rows(1)[0], row])
    with pytest.raises(ValueError, match=message):
        load_dataset_spec(str(path))


def test_open_examples_skip_generation_and_have_null_accuracy(tiny_model_dir, char_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    import overmem.dynamics as dynamics

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts_seen = []
    real_generate = dynamics.generate_greedy

    def spy(model, tokenizer, prompts, **kwargs):
        prompts_seen.extend(prompts)
        return real_generate(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(dynamics, "generate_greedy", spy)
    eval_cfg, gen_cfg = EvalConfig(bootstrap=100), GenerationConfig(max_new_tokens=4)
    from overmem.data.alpaca import alpaca_example

    open_examples = [alpaca_example(r, f"o/{i}") for i, r in enumerate(alpaca_rows(3))]
    rows = evaluate_examples(model, char_tokenizer, open_examples, eval_cfg=eval_cfg, gen_cfg=gen_cfg,
                             max_length=256, quiet=True)
    assert prompts_seen == []  # no generation at all
    assert all("correct" not in r and "generation" not in r and r["ppl"] > 1 for r in rows)
    summary = split_summary(rows, eval_cfg)
    assert summary["accuracy"] is None and summary["accuracy_ci_low"] is None and "n_unchecked" not in summary
    assert summary["ppl"] == pytest.approx(sum(r["ppl"] for r in rows) / 3)

    # A mixed set: only the checkable examples are generated for and counted in the accuracy.
    mixed = toy_examples(2) + open_examples
    rows = evaluate_examples(model, char_tokenizer, mixed, eval_cfg=eval_cfg, gen_cfg=gen_cfg, max_length=256,
                             quiet=True)
    assert len(prompts_seen) == 2 and "Tom has" in prompts_seen[0]
    summary = split_summary(rows, eval_cfg)
    assert summary["n_unchecked"] == 3
    assert summary["accuracy"] == pytest.approx((rows[0]["correct"] + rows[1]["correct"]) / 2)


def test_evaluate_alpaca_file(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(5))
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "-q"]) == 0
    text = out.read_text()
    row = json.loads(text)
    assert '"accuracy": null' in text and row["accuracy_ci_low"] is None and row["accuracy_ci_high"] is None
    samples = read_jsonl(tmp_path / "r.samples.jsonl")
    assert row["n"] == len(samples) == 5 and all("generation" not in s for s in samples)
    assert row["ppl"] == pytest.approx(sum(s["ppl"] for s in samples) / 5)
    assert "accuracy=-" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_run_on_alpaca_data(tiny_model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(24))
    test = write_jsonl(tmp_path / "test.jsonl", alpaca_rows(6, offset=100))
    out = tmp_path / "run"
    sets = [f"model.name_or_path={tiny_model_dir}", f"data.train={train}[:16]", f"data.tests={{test: {test}}}",
            "data.monitor_size=4", "data.validation_size=4", "train.method=full", "train.epochs=2", "train.lr=5e-3",
            "train.batch_size=8", "train.micro_batch_size=8", "train.warmup_steps=0"]
    cfg = tmp_path / "config.yaml"
    cfg.write_text("quiet: true\n")
    assert main(["run", str(cfg), "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    rows = read_jsonl(out / "dynamics.jsonl")
    assert {(r["checkpoint"], r["split"]) for r in rows} == {
        (f"epoch-{e}", s) for e in range(3) for s in ("train", "validation", "test")}
    assert all(r["accuracy"] is None and r["ppl"] > 1 for r in rows)
    # Training lowers the perplexity of the training subset.
    train_ppl = {r["checkpoint"]: r["ppl"] for r in rows if r["split"] == "train"}
    assert train_ppl["epoch-2"] < train_ppl["epoch-0"]
    phases = json.loads((out / "phases.json").read_text())
    assert {c["label"] for c in phases["checkpoints"]} <= {"high_ppl", "low_ppl"}  # nothing needing accuracy
    assert phases["onset"] is None and any("not measured" in w for w in phases["warnings"])
    assert (out / "dynamics.png").is_file()

    # Selection falls back to the lowest validation perplexity, and says so.
    assert main(["select", str(out)]) == 0
    sel = json.loads((out / "selection.json").read_text())
    valid = {r["checkpoint"]: r["ppl"] for r in rows if r["split"] == "validation"}
    assert sel["rule"] == "lowest_valid_ppl"
    assert sel["choices"]["recommended"]["checkpoint"] == min(valid, key=valid.get)
    assert "fallback rule" in sel["choices"]["recommended"]["reason"]
    assert main(["report", str(out)]) == 0
    assert "falls back to the lowest validation perplexity" in (out / "report.html").read_text()


def test_paper_config_splits(tmp_path):
    """examples/paper/alpaca.yaml on an AlpacaCleaned-shaped file: 10K training rows, validation and
    test drawn from disjoint unseen ranges; the judge configured but not in the default suite."""
    from pathlib import Path

    from overmem.analysis.base import default_suite
    from overmem.config import load_config
    from overmem.data.splits import derive_splits

    (tmp_path / "alpaca_cleaned").mkdir()
    (tmp_path / "alpaca_cleaned" / "alpaca_data_cleaned.json").write_text(json.dumps(alpaca_rows(40600)))
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "paper" / "alpaca.yaml",
                      [f"data.data_dir={tmp_path}"])
    splits = derive_splits(cfg.data)
    index = {name: {int(ex.id.rsplit("/", 1)[1]) for ex in exs} for name, exs in splits.tracked.items()}
    assert len(splits.train) == 10000 and all(ex.kind == "open" for ex in splits.train)
    assert len(index["validation"]) == 500 and all(10000 <= i < 40000 for i in index["validation"])
    assert len(index["alpaca_heldout"]) == 500 and all(i >= 40000 for i in index["alpaca_heldout"])
    assert cfg.analysis.judge.endpoint == "http://localhost:8000/v1" and "judge" not in default_suite()
