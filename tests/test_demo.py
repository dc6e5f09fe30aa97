"""A shortened demo end to end: tiny pretraining, two finetuning epochs, every output file."""

import json

import pytest

from overmem.demo import check_demo, run_demo
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
