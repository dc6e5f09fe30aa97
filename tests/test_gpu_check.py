"""scripts/gpu_check.sh on the CPU (float32, smaller; the GPU-only steps skipped and said so), and
what it produced checked independently: the scan's rows are the run's, the evaluation's accuracy
is its samples', the merge is the mean of its two checkpoints. Also scripts/gpu_wheels.sh's list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (on a GPU the check is bf16, bigger)")
def test_gpu_check_runs_on_the_cpu(tmp_path):
    from safetensors.torch import load_file

    work = tmp_path / "work"
    done = _gpu_check("--work", str(work))
    assert done.returncode == 0, done.stdout + done.stderr + (work / "log.txt").read_text()
    table = {line.split()[0]: line for line in done.stdout.splitlines()
             if line.split() and line.split()[0] in ("doctor", "demo-sized", "run:", "scan", "evaluate", "merge",
                                                     "torchrun,")}
    for step in ("doctor", "demo-sized", "run:", "scan", "evaluate", "merge"):
        assert " pass " in table[step], table
    assert " skipped " in table["torchrun,"] and "no GPU" in table["torchrun,"]
    assert "bf16 on CUDA skipped: no GPU" in table["demo-sized"]
    assert "skipped for lack of a GPU: bf16 on CUDA" in done.stdout

    demo, scan = work / "demo", work / "scan"
    run_rows = {(r["checkpoint"], r["split"]): r for r in _rows(demo / "dynamics.jsonl")}
    scan_rows = {(r["checkpoint"], r["split"]): r for r in _rows(scan / "dynamics.jsonl")}
    assert set(run_rows) == set(scan_rows) == {(f"epoch-{e}", s) for e in range(3)
                                               for s in ("train", "validation", "test")}
    for key, row in run_rows.items():  # float32 on the CPU: the same numbers
        assert scan_rows[key]["ppl"] == pytest.approx(row["ppl"], rel=1e-6), key
        assert scan_rows[key]["accuracy"] == row["accuracy"], key

    result = json.loads((work / "evaluate.json").read_text())
    samples = _rows(work / "evaluate.samples.jsonl")
    assert result["n"] == len(samples) == 6
    assert result["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))

    merged = load_file(str(work / "merged" / "model.safetensors"))
    one = load_file(str(demo / "checkpoints" / "epoch-1" / "model.safetensors"))
    two = load_file(str(demo / "checkpoints" / "epoch-2" / "model.safetensors"))
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (one[name] + two[name]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--wheels", "/no/such/folder"], "not a folder"),
    (["--epochs", "two"], "not a whole number"),
    (["--frobnicate"], "unknown argument"),
])
def test_gpu_check_refuses_bad_arguments(args, message):
    done = _gpu_check(*args, timeout=60)
    assert done.returncode == 2 and message in done.stderr


def test_gpu_wheels_lists_what_the_gpu_machine_lacks():
    """overmem's own requirements that the preinstalled packages do not bring, at the tested versions."""
    sys.path.insert(0, str(ROOT))
    from overmem.doctor import _normal, read_constraints

    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_wheels.sh"), "--list"], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    listed = dict(line.split("==") for line in done.stdout.split())
    pins = read_constraints(ROOT / "constraints.txt")
    for name in ("pydantic", "math-verify", "matplotlib"):
        assert name in listed
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "sentence-transformers", "numpy"):
        assert name not in listed
    for name, version in listed.items():
        assert pins[_normal(name)][1] == version
