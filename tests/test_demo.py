"""A shortened demo end to end: tiny pretraining, two finetuning epochs, every output file."""

import json

import pytest

from overmem.demo import DEMO_EPOCHS, DEMO_PRETRAIN, DemoCheck, check_demo, demo_pretrain, run_demo
from overmem.results import read_jsonl
from overmem.tiny import PretrainConfig, TinyModelConfig


@pytest.mark.slow
def test_short_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVERMEM_CACHE", str(tmp_path / "cache"))
    small = PretrainConfig(steps=30, batch_size=8, warmup_steps=5, cooldown_steps=5,
                           model=TinyModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64))
    out = tmp_path / "demo"
    result = run_demo(out, epochs=2, quiet=True, pretrain=small, overrides=[
        "data.train=synthetic:train@24,seed=0", "data.validation_size=6", "data.monitor_size=6",
        "data.test_size=6", "generation.max_new_tokens=40", "train.batch_size=8", "train.micro_batch_size=8",
    ])
    rows = read_jsonl(out / "dynamics.jsonl")
    assert {(r["checkpoint"], r["split"]) for r in rows} == {
        (f"epoch-{e}", s) for e in range(3) for s in ("train", "validation", "test")}
    for name in ("dynamics.png", "dynamics.svg", "selection.json", "phases.json", "config.yaml"):
        assert (out / name).stat().st_size > 0
    check = check_demo(out)
    test_rows = [r for r in rows if r["split"] == "test"]
    assert check.best_accuracy == max(r["accuracy"] for r in test_rows)
    assert check.min_ppl == min(r["ppl"] for r in test_rows)
    assert result["check"] == check
    assert len(json.loads((out / "phases.json").read_text())["checkpoints"]) == 3
    text = capsys.readouterr().out
    assert "overmem demo finished" in text and "dynamics.png" in text
    # The pretrained base is cached: a second call reuses it.
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists()


def test_demo_pretrain_steps_scale_the_cooldown():
    assert demo_pretrain() == DEMO_PRETRAIN
    assert (DEMO_PRETRAIN.steps, DEMO_PRETRAIN.cooldown_steps) == (1500, 200)  # 2/15 of 1500
    shorter = demo_pretrain(600)
    assert (shorter.steps, shorter.cooldown_steps) == (600, 100)  # 2/15 of 600 is 80: at least 100
    assert demo_pretrain(3000).cooldown_steps == 400
    assert shorter.model == DEMO_PRETRAIN.model and shorter.digest() != DEMO_PRETRAIN.digest()
    with pytest.raises(ValueError, match="--pretrain-steps: 10 is too few"):
        demo_pretrain(10)


def test_demo_cli_rejects_too_few_pretrain_steps(tmp_path, capsys):
    from overmem.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--pretrain-steps", "10"]) == 2
    assert "--pretrain-steps: 10 is too few" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_demo_cli_defaults_are_the_demo_modules():
    """The CLI repeats the demo's defaults (the demo module imports torch and loads lazily)."""
    from overmem.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.epochs, args.pretrain_steps) == (DEMO_EPOCHS, DEMO_PRETRAIN.steps)


def test_demo_checks_count_values_on_the_threshold_as_passing():
    """0.95 is within 5 points of 1.00, although 1.00 - 0.95 > 0.05 in floats."""
    on_edge = DemoCheck(best_accuracy=1.0, last_accuracy=0.95, min_ppl=1.1, last_ppl=2.2,
                        late_labels=["over_memorized"]).passed
    assert 1.0 - 0.95 > 0.05  # what the slack is for
    assert all(on_edge.values())
    below = DemoCheck(best_accuracy=1.0, last_accuracy=0.945, min_ppl=1.1, last_ppl=2.19,
                      late_labels=["over_memorized", "overfitting"]).passed
    assert list(below.values()) == [True, False, False, False]


def test_bench_demo_reads_the_readmes_table_and_prints_the_difference():
    """benchmarks/bench_demo.py compares with the README's demo table, which it reads (seed 0 at least)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_demo", root / "benchmarks" / "bench_demo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    readme = bench.readme_figures((root / "README.md").read_text())
    row = readme[0]
    assert row["checks"] == 4 and row["ratio"] == round(row["last_ppl"] / row["min_ppl"], 2)
    same = bench.difference(dict(row), row)
    assert "the README's figures exactly" in same and "last ppl +0.000" in same
    moved = bench.difference({**row, "last": row["last"] + 0.01, "wall": row["wall"] - 30}, row)
    assert "differs from the README" in moved and "last acc +0.010" in moved and "wall -30 s" in moved
    assert "no README row" in bench.difference(dict(row), None)
