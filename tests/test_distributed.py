"""Several processes, one run: `torchrun --nproc_per_node 2` on the CPU (gloo) against one process.

The 2-process tests launch torchrun as a subprocess on the tiny random Llama. They are marked slow
(`pytest -m "not slow"` skips them in a quick loop) but CI runs them: its test command keeps slow
tests. They are few and small: seconds of training, most of their time is starting torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from overmem.cli import main
from overmem.config import ConfigError, load_config
from overmem.data.encoding import length_sorted_batches
from overmem.results import read_jsonl
from tests.conftest import make_char_tokenizer, toy_examples

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3  # 2 optimizer steps an epoch: the kill test cuts the Trainer's checkpoint of step 4
PPL_TOL = 1e-6  # relative; measured here: 0 (the same batches give the same float32 numbers)
LOSS_TOL = 1e-5  # relative, logged training losses; measured here: 0


def _config(tmp: Path, model_dir: Path, files: dict[str, Path]) -> Path:
    path = tmp / "config.yaml"
    path.write_text(textwrap.dedent(f"""\
        quiet: true
        model: {{name_or_path: '{model_dir}'}}
        data: {{train: '{files["train"]}[:8]', tests: {{test: '{files["test"]}'}}, monitor_size: 5,
                validation_size: 5}}
        train: {{method: full, epochs: {EPOCHS}, lr: 5.0e-3, batch_size: 4, micro_batch_size: 2, warmup_steps: 0}}
        generation: {{max_new_tokens: 12}}
        eval: {{bootstrap: 100, batch_size: 2}}
        """))
    return path


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    """The training losses logged at each step, from the Trainer's last checkpoint."""
    last = max((run / "trainer_state").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [h["loss"] for h in json.loads((last / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Per-example rows equal: perplexities within PPL_TOL, everything else (generations) exactly."""
    assert len(a) == len(b) and [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if key in ("ppl", "nll_sum") and x[key] is not None:
                assert y[key] == pytest.approx(x[key], rel=PPL_TOL, abs=0), (x["id"], key)
            else:
                assert x[key] == y[key], (x["id"], key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The same config run in one process (in-process CLI) and under torchrun with 2 processes, each
    followed by `evaluate` of its epoch-1 and `scan` of its checkpoints into another folder."""
    from tests.conftest import write_toy_jsonl

    tmp = tmp_path_factory.mktemp("dist")
    files = write_toy_jsonl(tmp)
    config = _config(tmp, tiny_model_dir, files)
    one, two = tmp / "one", tmp / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1)
    try:
        assert main(["run", str(config), "--out", str(one / "run")]) == 0
        assert main(["evaluate", "--model", str(one / "run/checkpoints/epoch-1"), "--data", str(files["test"]),
                     "--out", str(one / "eval.json"), "-q", "--set", "generation.max_new_tokens=12"]) == 0
        assert main(["scan", str(one / "run"), "--out", str(one / "scan"), "--config", str(config)]) == 0
    finally:
        torch.set_num_threads(threads)
    script = tmp / "two.py"  # one launch for the three commands: torch's start-up is most of the time
    script.write_text(textwrap.dedent(f"""\
        import sys
        from overmem.cli import main
        from overmem.distributed import shutdown
        codes = [main(["run", "{config}", "--out", "{two / 'run'}"]),
                 main(["evaluate", "--model", "{two / 'run/checkpoints/epoch-1'}", "--data", "{files['test']}",
                       "--out", "{two / 'eval.json'}", "-q", "--set", "generation.max_new_tokens=12"]),
                 main(["scan", "{two / 'run'}", "--out", "{two / 'scan'}", "--config", "{config}"])]
        shutdown()
        sys.exit(max(codes))
        """))
    proc = _torchrun(str(script))
    _check(proc)
    return {"one": one, "two": two, "config": config, "files": files, "tmp": tmp, "log": proc.stdout + proc.stderr}


@pytest.mark.slow  # CI runs it (the default test command keeps slow tests)
def test_two_processes_write_the_run_once_and_match_one_process(runs):
    one, two = runs["one"] / "run", runs["two"] / "run"
    rows1, rows2 = read_jsonl(one / "dynamics.jsonl"), read_jsonl(two / "dynamics.jsonl")
    keys = [(r["checkpoint"], r["split"]) for r in rows2]
    assert len(keys) == len(set(keys)) == (EPOCHS + 1) * 3  # every (checkpoint, split) once
    assert keys == [(r["checkpoint"], r["split"]) for r in rows1]
    for r1, r2 in zip(rows1, rows2):
        assert r2["ppl"] == pytest.approx(r1["ppl"], rel=PPL_TOL, abs=0)
        assert (r2["accuracy"], r2["n"], r2["step"], r2["epoch"]) == (r1["accuracy"], r1["n"], r1["step"], r1["epoch"])
        _same_rows(read_jsonl(one / "samples" / r1["checkpoint"] / f"{r1['split']}.jsonl"),
                   read_jsonl(two / "samples" / r2["checkpoint"] / f"{r2['split']}.jsonl"))
    # The same global batch: the same losses step by step (4 examples a step: 2 ranks x 2, or 2 x 2 accumulated).
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == 2 * EPOCHS
    assert l2 == pytest.approx(l1, rel=LOSS_TOL)
    # Written once: one timing per stage, one resolved config recording the processes, no leftovers.
    stages = [t["stage"] for t in json.loads((two / "timings.json").read_text())]
    assert len(stages) == len(set(stages)) and "train" in stages
    cfg = load_config(two / "config.yaml")
    assert cfg.train.world_size == 2 and cfg.train.grad_accum == 1 and cfg.train.micro_batch_size == 2
    assert load_config(one / "config.yaml").train.world_size == 1
    for name in ("phases.json", "selection.json", "dynamics.png", "report.html", "environment.json"):
        assert (two / name).stat().st_size > 0
    assert not [p for p in two.rglob("*") if p.name.startswith(".")]  # no temp files or folders left
    assert json.loads((two / "phases.json").read_text()) == json.loads((one / "phases.json").read_text())
    # The outcome is printed by rank 0 only.
    assert runs["log"].count(f"results in {two}\n") == runs["log"].count(f"wrote {runs['two'] / 'eval.json'}") == 1
    # Each rank saved the same weights as the single process (DDP keeps replicas equal).
    w1, w2 = (load_file(r / f"checkpoints/epoch-{EPOCHS}/model.safetensors") for r in (one, two))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # CI runs it (the default test command keeps slow tests)
def test_sharded_evaluate_and_scan_equal_one_process(runs):
    one, two = runs["one"], runs["two"]
    e1, e2 = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert e1.keys() == e2.keys() and e1["n"] == e2["n"] == 8
    for key in e1:
        if key in ("ppl", "ppl_token", "nll_token"):
            assert e2[key] == pytest.approx(e1[key], rel=PPL_TOL, abs=0)
        elif key != "checkpoint":
            assert e2[key] == e1[key], key
    _same_rows(read_jsonl(one / "eval.samples.jsonl"), read_jsonl(two / "eval.samples.jsonl"))
    s1, s2 = (read_jsonl(d / "scan" / "dynamics.jsonl") for d in (one, two))
    assert [(r["checkpoint"], r["split"]) for r in s2] == [(r["checkpoint"], r["split"]) for r in s1]
    assert len({(r["checkpoint"], r["split"]) for r in s2}) == len(s2)
    for r1, r2 in zip(s1, s2):
        assert r2["ppl"] == pytest.approx(r1["ppl"], rel=PPL_TOL, abs=0) and r2["accuracy"] == r1["accuracy"]


@pytest.mark.slow  # CI runs it (the default test command keeps slow tests)
def test_kill_under_torchrun_then_rerun_completes(runs):
    """Rank 0 is SIGKILLed while the Trainer writes its step-4 checkpoint (torchrun then stops rank 1);
    the same torchrun command again resumes from step 2 and ends as the uninterrupted run."""
    out = runs["tmp"] / "killed"
    script = runs["tmp"] / "killed.py"
    script.write_text(textwrap.dedent(f"""\
        import os, signal, sys
        from transformers import Trainer
        from overmem.cli import main
        from overmem.distributed import rank

        save_rng_state = Trainer._save_rng_state

        def killed_at_step_4(self, output_dir):  # weights, optimizer and scheduler are on disk by now
            if self.state.global_step == 4 and rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            save_rng_state(self, output_dir)

        Trainer._save_rng_state = killed_at_step_4
        sys.exit(main(["run", "{runs['config']}", "--out", "{out}"]))
        """))
    killed = _torchrun(str(script))
    assert killed.returncode != 0
    assert not (out / f"checkpoints/epoch-{EPOCHS}").exists()
    assert not (out / "trainer_state/checkpoint-4/trainer_state.json").exists()
    _check(_torchrun("-m", "overmem", "run", str(runs["config"]), "--out", str(out)))
    ref = runs["two"] / "run"
    rows, ref_rows = read_jsonl(out / "dynamics.jsonl"), read_jsonl(ref / "dynamics.jsonl")
    assert [(r["checkpoint"], r["split"]) for r in rows] == [(r["checkpoint"], r["split"]) for r in ref_rows]
    for r, q in zip(rows, ref_rows):
        assert r["ppl"] == pytest.approx(q["ppl"], rel=PPL_TOL, abs=0) and r["accuracy"] == q["accuracy"]
    assert _losses(out) == pytest.approx(_losses(ref), rel=LOSS_TOL)
    assert (out / "report.html").exists() and (out / "selection.json").exists()


@pytest.mark.slow  # CI runs it (the default test command keeps slow tests)
def test_divergence_stops_every_rank_at_the_same_step(runs):
    """A huge learning rate under torchrun: both ranks stop at step 2 (no rank left waiting in a
    collective), exit 1, and rank 0 writes phases and report of the checkpoints before it, once."""
    out = runs["tmp"] / "diverged"
    proc = _torchrun("-m", "overmem", "run", str(runs["config"]), "--out", str(out), "--set", "train.lr=1e10",
                     timeout=240)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("overmem run: error:")]
    assert lines and all("training diverged at step 2 (loss nan)" in line for line in lines)
    rows = read_jsonl(out / "dynamics.jsonl")
    assert [(r["checkpoint"], r["split"]) for r in rows] == [("epoch-0", s) for s in ("train", "validation", "test")]
    assert (out / "phases.json").exists() and (out / "report.html").exists()


LIBRARY_SCRIPT = """\
import sys
from transformers import Trainer, TrainingArguments
from overmem.callback import OverMemorizationCallback
from overmem.config import EvalConfig, GenerationConfig
from overmem.data.encoding import encode_example
from overmem.distributed import RankFailed, evaluate_sharded, on_main, rank, world_size
from overmem.train.trainer import ResponseOnlyCollator
from tests.conftest import make_char_tokenizer, make_tiny_llama, toy_examples


def train_with_callback(out):
    \"\"\"A user's own Trainer script: 4 examples a step (2 per device, accumulated in one process).\"\"\"
    tok = make_char_tokenizer()
    model = make_tiny_llama(len(tok)).train()
    feats = [dict(zip(("input_ids", "labels"), encode_example(tok, ex, max_length=96, add_eos=True)[:2]))
             for ex in toy_examples(8)]
    cb = OverMemorizationCallback(tok, {"validation": toy_examples(5, "v", 50), "test": toy_examples(5, "t", 80)}, out,
                                  eval_cfg=EvalConfig(batch_size=2, bootstrap=100),
                                  gen_cfg=GenerationConfig(max_new_tokens=8), max_length=96)
    args = TrainingArguments(output_dir=f"{out}/hf", per_device_train_batch_size=2,
                             gradient_accumulation_steps=2 // world_size(), num_train_epochs=2, learning_rate=5e-3,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                             disable_tqdm=True, remove_unused_columns=False, ddp_find_unused_parameters=False)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=ResponseOnlyCollator(0),
                      callbacks=[cb])
    cb.bind(trainer)
    trainer.train()
    return [h for h in trainer.state.log_history if any(k.startswith("overmem/") for k in h)]


def write():
    raise OSError(28, "No space left on device", "dynamics.jsonl")


def evaluate(part):
    if rank() == 1:
        raise ValueError("bad shard")
    return [ex.id for ex in part]


if __name__ == "__main__":
    try:
        on_main(write)
    except RankFailed as err:
        print(f"rank {rank()} stopped: {err}", flush=True)
    except OSError:
        print("rank 0 raised its own error", flush=True)
    try:
        evaluate_sharded(evaluate, make_char_tokenizer(), toy_examples(5), batch_size=2, max_length=64)
    except (RankFailed, ValueError) as err:
        print(f"rank {rank()} shard: {type(err).__name__}: {err}", flush=True)
    logged = train_with_callback(sys.argv[1])
    print(f"rank {rank()} logged {len(logged)}", flush=True)
"""


@pytest.mark.slow  # CI runs it (the default test command keeps slow tests)
def test_library_under_torchrun(tmp_path):
    """A failure on one rank ends every rank at once, and the callback in a user's own Trainer script
    evaluates sharded and writes once.

    A write that fails on rank 0 makes rank 1 raise RankFailed instead of waiting at the next
    collective; a failing shard of an evaluation likewise. The callback's rows equal those of the
    same script in one process."""
    import runpy

    script = tmp_path / "library.py"
    script.write_text(LIBRARY_SCRIPT)
    proc = _torchrun(str(script), str(tmp_path / "two"), timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 raised its own error" in out
    assert "rank 1 stopped: rank 0 failed: OSError: [Errno 28] No space left on device: 'dynamics.jsonl'" in out
    assert "rank 0 shard: RankFailed: rank 1: ValueError: bad shard" in out
    assert "rank 1 shard: ValueError: bad shard" in out
    assert "rank 0 logged 3" in out and "rank 1 logged 3" in out  # epoch-0, 1, 2: each rank's Trainer state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(script), run_name="one_process")["train_with_callback"](str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    rows1, rows2 = (read_jsonl(tmp_path / d / "dynamics.jsonl") for d in ("one", "two"))
    keys = [(r["checkpoint"], r["split"]) for r in rows2]
    assert keys == [(r["checkpoint"], r["split"]) for r in rows1] and len(set(keys)) == len(keys) == 6
    for r1, r2 in zip(rows1, rows2):
        assert r2["ppl"] == pytest.approx(r1["ppl"], rel=PPL_TOL, abs=0) and r2["accuracy"] == r1["accuracy"]
        _same_rows(read_jsonl(tmp_path / "one/samples" / r1["checkpoint"] / f"{r1['split']}.jsonl"),
                   read_jsonl(tmp_path / "two/samples" / r2["checkpoint"] / f"{r2['split']}.jsonl"))


# ---- one process: the pieces ---------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_whole_batches_of_one_process(monkeypatch, world):
    """Each rank's share sorts into exactly the batches dealt to it, so every example is scored
    with the same batch mates (and padding) as in one process; the shares cover every example once."""
    from overmem import distributed

    tok = make_char_tokenizer()
    examples = toy_examples(11) + toy_examples(6, "long", offset=40)
    batches = [idx for idx, _ in length_sorted_batches(tok, examples, batch_size=3, max_length=64)]
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    shares = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        share = distributed.shard_indices(tok, examples, batch_size=3, max_length=64)
        assert share == sorted(share)
        part = [examples[i] for i in share]
        got = [[share[j] for j in idx] for idx, _ in length_sorted_batches(tok, part, batch_size=3, max_length=64)]
        assert got == batches[r::world]
        shares += share
    assert sorted(shares) == list(range(len(examples)))


def test_one_process_needs_no_process_group():
    from overmem import distributed

    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.on_main(lambda: 7) == 7 and distributed.broadcast("x") == "x"
    assert distributed.evaluate_sharded(lambda xs: [x * 2 for x in xs], None, [1, 2], batch_size=1,
                                        max_length=8) == [2, 4]
    assert not torch.distributed.is_initialized()


def test_the_group_is_left_at_exit_once(monkeypatch):
    """Joining (or finding) a group registers `shutdown` to run at interpreter exit, once however
    often the group is used; one process registers nothing."""
    import atexit

    from overmem import distributed

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    distributed._leave_at_exit.cache_clear()
    assert not distributed.setup() and registered == []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_initialized", lambda: True)  # as after the Trainer made the group
    assert distributed.setup() and distributed.setup()
    assert registered == [distributed.shutdown]
    distributed._leave_at_exit.cache_clear()  # a later test's group registers again


def test_global_batch_is_split_over_processes(monkeypatch):
    from overmem import distributed
    from overmem.train.trainer import with_world_size

    cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=2"])
    assert cfg.train.grad_accum == 4
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr("overmem.train.trainer.world_size", lambda: 2)
    two = with_world_size(cfg)
    assert (two.train.world_size, two.train.grad_accum) == (2, 2)  # 2 ranks x 2 x 2 accumulated = 8
    monkeypatch.setattr("overmem.train.trainer.world_size", lambda: 3)
    with pytest.raises(ConfigError, match=r"train\.batch_size \(8\).*train\.micro_batch_size \(2\).*3 processes"):
        with_world_size(cfg)


def test_deepspeed_settings_are_checked_before_the_run(tiny_model_dir, tmp_path):
    """A DeepSpeed config that cannot be used is a one-line error naming train.deepspeed."""
    from overmem.models import load_model
    from overmem.results import RunDir
    from overmem.train.trainer import check_training_settings

    model = load_model(load_config(None, [f"model.name_or_path={tiny_model_dir}"]).model)
    bad = tmp_path / "ds.json"
    bad.write_text("zero_optimization: {stage: 3}\n")
    for path, message in ((tmp_path / "missing.json", "file not found"), (bad, "not valid JSON")):
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", f"train.deepspeed={path}"])
        with pytest.raises(ConfigError, match=rf"^train\.deepspeed: {path}: {message}"):
            check_training_settings(cfg, RunDir(tmp_path / "run"), model)
    assert not (tmp_path / "run").exists()


def test_commands_not_shared_run_on_rank_0_only(monkeypatch, tmp_path, capsys):
    """Under a launcher, rank 1 leaves `analyze` (and every command that is not shared out) to rank 0:
    it returns at once, even for a folder rank 0 would refuse."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["analyze", str(tmp_path / "missing"), "--checkpoints", "epoch-1"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["analyze", str(tmp_path / "missing"), "--checkpoints", "epoch-1"]) == 2


def test_python_dash_m_overmem():
    """`python -m overmem`, the form torchrun and accelerate launch start."""
    proc = subprocess.run([sys.executable, "-m", "overmem", "--version"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("overmem ")


def test_vllm_backend_is_for_one_process(monkeypatch, tmp_path):
    """Several processes share evaluation out with the Hugging Face backend; asking for vLLM there is a
    one-line error before anything is written."""
    from overmem import pipeline

    monkeypatch.setattr(pipeline, "setup", lambda: True)
    monkeypatch.setattr(pipeline, "world_size", lambda: 2)
    cfg = load_config(None, ["eval.backend=vllm", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^eval\.backend: 'vllm' with 2 processes.*eval\.backend=hf"):
        pipeline.run(cfg)
    assert not (tmp_path / "run").exists()
