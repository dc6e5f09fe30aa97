"""`eval.overlap`: checkpoints tracked in a second process while training goes on (overmem.overlap)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overmem.cli import main
from overmem.config import config_from_dict
from overmem.data.example import Example
from overmem.overlap import OverlapTracker, TrackerFailed, _Evaluator, handed_splits
from overmem.results import read_jsonl
from tests.conftest import make_tiny_llama, toy_examples
from tests.test_reuse import _run_args


def _rows(run: Path) -> list[dict]:
    """Every figure of `dynamics.jsonl`: not the time taken, nor the draft counts, which depend on
    which checkpoint's generations were the drafts (see `OverlapTracker.close`)."""
    return [{k: v for k, v in r.items() if k != "seconds" and not k.startswith("draft_")}
            for r in read_jsonl(run / "dynamics.jsonl")]


@pytest.mark.slow
def test_a_run_with_overlap_writes_the_rows_of_a_run_without(tiny_model_dir, toy_jsonl, tmp_path, one_thread):
    plain, overlapped = tmp_path / "plain", tmp_path / "overlapped"
    assert main(["run", *_run_args(tiny_model_dir, toy_jsonl, plain)]) == 0
    assert main(["run", *_run_args(tiny_model_dir, toy_jsonl, overlapped, "eval.overlap=true")]) == 0
    want = _rows(plain)
    assert [r["checkpoint"] for r in want] == [c for c in ("epoch-0", "epoch-1", "epoch-2", "epoch-3")
                                               for _ in range(3)]
    assert _rows(overlapped) == want  # every figure, bit for bit
    for name in ("phases.json", "selection.json"):
        assert json.loads((overlapped / name).read_text()) == json.loads((plain / name).read_text())
    for ckpt in ("epoch-0", "epoch-3"):  # the generations themselves
        for split in ("train", "validation", "test"):
            mine, theirs = (read_jsonl(run / "samples" / ckpt / f"{split}.jsonl") for run in (overlapped, plain))
            assert [s["generation_ids"] for s in mine] == [s["generation_ids"] for s in theirs]
    stages = {t["stage"]: t for t in json.loads((overlapped / "timings.json").read_text())}
    # both processes' evaluation time: the rows' own seconds, and loading each checkpoint
    assert stages["track (second process)"]["seconds"] >= sum(r["seconds"] for r in read_jsonl(
        overlapped / "dynamics.jsonl")) - 0.01
    assert "in the second process" in stages["track (second process)"]["note"]
    assert "track (second process)" not in {t["stage"] for t in json.loads((plain / "timings.json").read_text())}


@pytest.mark.parametrize("backend", ["vllm", "auto"])
def test_overlap_needs_the_hugging_face_backend(tiny_model_dir, toy_jsonl, tmp_path, capsys, backend):
    out = tmp_path / "run"
    code = main(["run", *_run_args(tiny_model_dir, toy_jsonl, out, "eval.overlap=true", f"eval.backend={backend}")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "eval.overlap" in err and "eval.backend=hf" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_failing_worker_is_a_one_line_error_and_ends(tmp_path, one_thread):
    cfg = config_from_dict({"model": {"name_or_path": str(tmp_path / "no-such-model")}, "out_dir": str(tmp_path / "r"),
                            "quiet": True})
    tracker = OverlapTracker(cfg, {"test": [Example(id="a", question="1+1?", response="2\n#### 2", answer="2")]},
                             threads=1)
    try:
        tracker.submit("epoch-0", None, 0, 0)
        with pytest.raises(TrackerFailed, match="no-such-model") as err:
            for _ in range(120):
                tracker.poll(timeout=1.0)
        assert "\n" not in str(err.value)
        tracker.process.join(30)
        assert not tracker.process.is_alive()
    finally:
        tracker.stop()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_worker_ends_with_the_run_and_a_rerun_finishes(tiny_model_dir, toy_jsonl, tmp_path, how):
    # No one_thread fixture: the reference trains here and the run in a subprocess, on as many threads.
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(["run", *_run_args(tiny_model_dir, toy_jsonl, ref)]) == 0
    cmd = [sys.executable, "-m", "overmem.cli", "run", *_run_args(tiny_model_dir, toy_jsonl, out, "eval.overlap=true")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    workers: list[int] = []
    while not workers or not (out / "dynamics.jsonl").exists():  # the worker has started evaluating
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was stopped"
        workers = workers or _children(proc.pid)
        time.sleep(0.01)
    proc.send_signal(how)
    assert proc.wait(60) == (-signal.SIGKILL if how == signal.SIGKILL else 143)
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "the tracking process outlived the run"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The same rows; their order in the file may not be one process's after a kill (the rerun finds
    # every checkpoint saved and evaluates what is missing in the training process).
    by_pair = lambda rows: sorted(rows, key=lambda r: (r["step"], r["split"]))  # noqa: E731
    assert by_pair(_rows(out)) == by_pair(_rows(ref))


@pytest.mark.slow
def test_a_worker_done_with_its_splits_takes_the_last_checkpoints_back(char_tokenizer, tmp_path, one_thread,
                                                                      monkeypatch):
    models = []
    for seed in range(3):  # three different models: the drafts are partly accepted
        models.append(tmp_path / f"model-{seed}")
        make_tiny_llama(len(char_tokenizer), seed=seed).save_pretrained(models[-1])
        char_tokenizer.save_pretrained(models[-1])
    jobs = [("epoch-0", None, 0.0, 0)] + [(f"epoch-{k}", str(models[k % 3]), float(k), 2 * k) for k in range(1, 6)]
    tracked = {"train": toy_examples(2, "train"), "test": toy_examples(10, "test")}  # the test split is handed

    def config(out: Path):
        return config_from_dict({"model": {"name_or_path": str(models[0])}, "out_dir": str(out), "quiet": True,
                                 "generation": {"max_new_tokens": 16}}, "test")

    want = tmp_path / "one-process"
    evaluate = _Evaluator(config(want), tracked, quiet=True)
    for index, (name, path, epoch, step) in enumerate(jobs):
        for split in tracked:
            evaluate((index, name, path, epoch, step), split)

    out = tmp_path / "two-processes"
    tracker = OverlapTracker(config(out), tracked, threads=1)
    assert tracker.handed == ["test"]
    own = _Evaluator.__call__

    def after_the_worker_took_the_last(self, job, split):  # the training process, held back
        deadline = time.monotonic() + 240
        while ("epoch-5", "test") not in self.run.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        return own(self, job, split)

    monkeypatch.setattr(_Evaluator, "__call__", after_the_worker_took_the_last)
    try:
        for name, path, epoch, step in jobs:
            tracker.submit(name, path, epoch, step)
        tracker.close()
    finally:
        tracker.stop()
    assert tracker.taken >= 1 and tracker.helped > 0  # both processes evaluated test splits after training
    pairs = [(r["checkpoint"], r["split"]) for r in read_jsonl(out / "dynamics.jsonl")]
    assert pairs == [(name, split) for name, *_ in jobs for split in tracked]  # each once, in one process's order

    assert _rows(out) == _rows(want)
    for name, *_ in jobs:  # the generations themselves; draft counts differ where drafts came from elsewhere
        for split in tracked:
            mine, theirs = (read_jsonl(run / "samples" / name / f"{split}.jsonl") for run in (out, want))
            assert [s["generation_ids"] for s in mine] == [s["generation_ids"] for s in theirs]
            assert [s["ppl"] for s in mine] == [s["ppl"] for s in theirs]


def test_the_training_process_takes_the_largest_splits_up_to_half():
    def sizes(**n):
        return {name: [None] * k for name, k in n.items()}

    assert handed_splits(sizes(train=50, validation=100, test=200)) == ["test"]  # the demo: 200 of 350
    assert handed_splits(sizes(train=50, validation=100, test=100, ood=100)) == ["validation", "test"]
    assert handed_splits(sizes(a=10, b=10, c=10, d=10)) == ["a", "b"]
    assert handed_splits(sizes(train=50, test=500)) == ["test"]  # the worker keeps one split at least
    assert handed_splits(sizes(test=200)) == []  # one split: nothing to share


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_whose_parent_died_while_it_started_ends_at_once():
    # The death signal is asked for once the worker runs; a parent that died before that (while the
    # worker still imported) is no longer the worker's parent, so the worker must end by itself.
    code = "import os, sys; from overmem.overlap import _die_with_parent; _die_with_parent({}); print('alive')"
    # Told that its parent is this test's own parent: as if the test had died and it had been adopted.
    orphan = subprocess.run([sys.executable, "-c", code.format(os.getppid())], capture_output=True, text=True)
    assert (orphan.returncode, orphan.stdout) == (1, "")
    child = subprocess.run([sys.executable, "-c", code.format("os.getppid()")], capture_output=True, text=True)
    assert (child.returncode, child.stdout) == (0, "alive\n")
