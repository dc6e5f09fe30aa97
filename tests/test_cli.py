"""End to end through the command line on a tiny random model: run, resume, scan, evaluate,
select, plot, and the errors users see."""

import json

import pytest

from overmem.cli import main
from overmem.results import read_jsonl


def _overrides(model_dir, files, epochs=2):
    sets = [
        f"model.name_or_path={model_dir}", f"data.train={files['train']}[:16]",
        f"data.tests={{test: {files['test']}}}", "data.monitor_size=6", "data.validation_size=6",
        "train.method=full", f"train.epochs={epochs}", "train.lr=5e-3", "train.batch_size=8",
        "train.micro_batch_size=4", "train.warmup_steps=0", "generation.max_new_tokens=24", "eval.bootstrap=200",
    ]
    return [a for s in sets for a in ("--set", s)]


def _run(tmp_path, model_dir, files, out, epochs=2):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("quiet: true\n")
    return main(["run", str(cfg), "--out", str(out), *_overrides(model_dir, files, epochs)])


def test_run_end_to_end_and_resume(tiny_model_dir, toy_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tmp_path, tiny_model_dir, toy_jsonl, out) == 0
    rows = read_jsonl(out / "dynamics.jsonl")
    assert {(r["checkpoint"], r["split"]) for r in rows} == {
        (f"epoch-{e}", s) for e in range(3) for s in ("train", "validation", "test")
    }
    for r in rows:
        for key in ("checkpoint", "epoch", "step", "split", "n", "ppl", "ppl_token", "accuracy",
                    "accuracy_ci_low", "accuracy_ci_high"):
            assert key in r
        assert r["accuracy_ci_low"] <= r["accuracy"] <= r["accuracy_ci_high"]
        samples = read_jsonl(out / "samples" / r["checkpoint"] / f"{r['split']}.jsonl")
        assert len(samples) == r["n"]
        assert r["ppl"] == pytest.approx(sum(s["ppl"] for s in samples) / len(samples))
    train_ppl = {r["epoch"]: r["ppl"] for r in rows if r["split"] == "train"}
    assert train_ppl[2] < train_ppl[0]  # training lowered the loss on the monitored subset
    for name in ("selection.json", "phases.json", "dynamics.png", "dynamics.svg", "config.yaml"):
        assert (out / name).stat().st_size > 0
    assert (out / "checkpoints" / "epoch-2" / "model.safetensors").exists()

    # Re-running resumes: nothing is recomputed or duplicated.
    before = (out / "dynamics.jsonl").read_text()
    assert _run(tmp_path, tiny_model_dir, toy_jsonl, out) == 0
    assert (out / "dynamics.jsonl").read_text() == before

    capsys.readouterr()
    before = (out / "selection.json").read_text()
    assert main(["select", str(out)]) == 0  # the run's own selection.json, read back
    text = capsys.readouterr().out
    assert "recommended" in text and "min_valid_ppl" in text and f"read {out / 'selection.json'}" in text
    sel = json.loads((out / "selection.json").read_text())
    assert set(sel["choices"]) == {"recommended", "last", "min_valid_ppl", "max_valid_acc"}
    assert (out / "selection.json").read_text() == before
    assert main(["select", str(out), "--band", "0.5"]) == 0  # another rule: selected afresh
    assert f"wrote {out / 'selection.json'}" in capsys.readouterr().out
    assert json.loads((out / "selection.json").read_text())["ppl_band"] == 0.5

    phases = (out / "phases.json").read_text()
    assert main(["plot", str(out)]) == 0  # drawn from the run's phases.json
    assert (out / "phases.json").read_text() == phases
    assert main(["plot", str(out), "--set", "phases.eps=0.25"]) == 0  # another rule: phases detected afresh
    assert json.loads((out / "phases.json").read_text())["rule"]["eps"] == 0.25
    assert "dynamics.png" in capsys.readouterr().out


def test_scan_and_evaluate(tiny_model_dir, toy_jsonl, tmp_path):
    out = tmp_path / "run"
    assert _run(tmp_path, tiny_model_dir, toy_jsonl, out, epochs=1) == 0

    # Scanning the same checkpoints into another folder gives the same numbers.
    scan_out = tmp_path / "scan"
    assert main(["scan", str(out), "--out", str(scan_out), "-q", *_overrides(tiny_model_dir, toy_jsonl, 1)]) == 0
    a = {(r["checkpoint"], r["split"]): r["ppl"] for r in read_jsonl(out / "dynamics.jsonl")}
    b = {(r["checkpoint"], r["split"]): r["ppl"] for r in read_jsonl(scan_out / "dynamics.jsonl")}
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4)

    res = tmp_path / "eval.json"
    ckpt = out / "checkpoints" / "epoch-1"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(toy_jsonl["test"]), "--out", str(res), "-q",
                 "--set", "generation.max_new_tokens=24"]) == 0
    row = json.loads(res.read_text())
    assert row["ppl"] == pytest.approx(a[("epoch-1", "test")], rel=1e-4)
    assert len(read_jsonl(tmp_path / "eval.samples.jsonl")) == row["n"] == 8


def test_errors_are_one_line(tmp_path, capsys, toy_jsonl, tiny_model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.yaml" in err and "train.lr" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()

    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--data", "gsm8:test", "--out",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "gsm8k" in err or "missing" in err
    assert not (tmp_path / "r.json").exists()


def test_bad_data_spec_leaves_no_run_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "c.yaml").write_text("quiet: true\n")
    code = main(["run", str(tmp_path / "c.yaml"), "--out", str(out), "--set", f"model.name_or_path={tiny_model_dir}",
                 "--set", "data.train=gsm8:train[:10]", "--set", "data.validation=gsm8k:test"])
    assert code == 2
    assert "did you mean 'gsm8k'" in capsys.readouterr().err
    assert not out.exists()


def test_every_subcommand_has_help(capsys):
    for cmd in ("run", "scan", "evaluate", "select", "plot", "merge", "demo"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0
        assert "usage: overmem " + cmd in capsys.readouterr().out


def test_python_entry_points():
    import overmem

    assert callable(overmem.run) and callable(overmem.scan) and callable(overmem.load_config)
