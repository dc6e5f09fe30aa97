"""`overmem demo`: over-memorization reproduced on a laptop CPU, offline, in minutes.

A tiny Llama pretrained on a stream of synthetic word problems written in a plain format (shipped
in the package, `overmem/assets/demo_base/`; other pretraining settings are trained once and
cached; `python -m overmem.demo --rebuild-base` rebuilds the shipped one) is finetuned with the
paper's instruction template on a small fixed set of problems for many epochs at a constant
learning rate, while every epoch is tracked on a training subset, a validation set and a test
set. Because every synthetic problem has many valid solution paths and its reference shows one at
random, the finetuned model grows over-confident in the paths of its training examples: test
accuracy stays high while the perplexity of the test references climbs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import RunConfig, apply_overrides, config_from_dict
from .phases import THRESHOLD_TOL
from .results import RunDir
from .tiny import SHIPPED_BASE, PretrainConfig, TinyModelConfig, build_base, get_tiny_base, shipped_base

# Torch threads of the finetuning and tracking: the same on every machine, since float sums split
# over another number of threads round otherwise and the runs drift apart (docs/commands/demo.md,
# "The same figures on another machine"); the tiny model gains little from a second thread.
DEMO_THREADS = 1

# Finetuning epochs: enough for the test perplexity to climb past twice its minimum while test
# accuracy holds within 5 points of its best (measured per seed: README, docs/commands/demo.md).
DEMO_EPOCHS = 50

# The pretraining stage. Its base ships in the package (`rebuild_base` makes it); other settings
# (`--pretrain-steps`) are trained on first use and cached.
DEMO_PRETRAIN = PretrainConfig(
    steps=1500, batch_size=32, lr=3e-3, warmup_steps=50, cooldown_steps=200, drill_frac=0.4, drill_lines=5,
    model=TinyModelConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
)


def demo_pretrain(steps: int = DEMO_PRETRAIN.steps) -> PretrainConfig:
    """The demo's pretraining stage with `steps` optimizer steps; the cool-down is the last
    2/15 of them (at least 100), so 1500 steps give `DEMO_PRETRAIN` and 600 a 100-step cool-down.

    More steps give a stronger base at a one-time cost (the demo docs give what 600 and 1500
    steps cost and give).
    """
    if steps < 150:
        raise ValueError(f"--pretrain-steps: {steps} is too few; use at least 150 (default {DEMO_PRETRAIN.steps})")
    return replace(DEMO_PRETRAIN, steps=steps, cooldown_steps=max(100, steps * 2 // 15))


def demo_config(
    base: Path, out_dir: str | Path, *, seed: int = 0, epochs: int = DEMO_EPOCHS, quiet: bool = False,
    overrides: list[str] | None = None,
) -> RunConfig:
    """The finetuning stage: full finetuning, constant LR after a short warmup (no decay, so the
    over-memorization stage is reached), 200 training problems (their references worded per
    item kind, `synthetic.TRAIN`), every epoch tracked."""
    raw = {
        "model": {"name_or_path": str(base), "dtype": "float32"},
        "train": {
            "method": "full", "lr": 1e-3, "scheduler": "constant_with_warmup", "warmup_steps": 10,
            "epochs": epochs, "batch_size": 16, "micro_batch_size": 16, "max_length": 320, "seed": seed,
        },
        "data": {
            "train": f"synthetic:train@200,seed={seed}",
            "validation": "synthetic:validation", "validation_size": 100, "monitor_size": 50,
            "tests": {"test": "synthetic:test"}, "test_size": 200, "seed": seed,
        },
        "generation": {"max_new_tokens": 160, "batch_size": 100},
        "eval": {"batch_size": 50, "overlap": True},
        "out_dir": str(out_dir),
        "quiet": quiet,
    }
    return config_from_dict(apply_overrides(raw, overrides or []), "demo config")


@dataclass
class DemoCheck:
    """What the demo must show, read back from its own dynamics.jsonl."""

    best_accuracy: float
    last_accuracy: float
    min_ppl: float
    last_ppl: float
    late_labels: list[str]

    @property
    def ppl_ratio(self) -> float:
        return self.last_ppl / self.min_ppl

    @property
    def passed(self) -> dict[str, bool]:
        return {
            "best test accuracy >= 0.60": self.best_accuracy >= 0.60,
            "last test ppl >= 2x its minimum": self.ppl_ratio >= 2.0,
            # The phase rule's float slack: 1.00 - 0.95 is 0.0500...04, and 0.95 is within 5 points.
            "last test accuracy within 5 points of best":
                self.best_accuracy - self.last_accuracy <= 0.05 + THRESHOLD_TOL,
            "late epochs labelled over-memorized": bool(self.late_labels)
            and all(label == "over_memorized" for label in self.late_labels),
        }


def check_demo(run_dir: str | Path, split: str = "test") -> DemoCheck:
    run = RunDir(run_dir)
    rows = sorted((r for r in run.read_dynamics() if r["split"] == split), key=lambda r: r["epoch"])
    phases = run.read_json(run.phases)
    labels = [c["label"] for c in phases["checkpoints"]]
    return DemoCheck(
        best_accuracy=max(r["accuracy"] for r in rows),
        last_accuracy=rows[-1]["accuracy"],
        min_ppl=min(r["ppl"] for r in rows),
        last_ppl=rows[-1]["ppl"],
        late_labels=labels[-max(1, len(labels) // 5):],
    )


def run_demo(
    out_dir: str | Path = "demo-run", *, seed: int = 0, epochs: int = DEMO_EPOCHS, quiet: bool = False,
    pretrain: PretrainConfig = DEMO_PRETRAIN, overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Pretrain (cached) + finetune + track + phases + selection + figure; prints a summary.

    `pretrain` and `overrides` (config `key=value`s) exist for shortened runs such as the tests'.
    """
    import torch

    from .pipeline import run

    t0 = time.perf_counter()
    shipped = shipped_base(pretrain) is not None
    base = get_tiny_base(pretrain, progress=not quiet)
    t_base = time.perf_counter() - t0
    cfg = demo_config(base, out_dir, seed=seed, epochs=epochs, quiet=quiet, overrides=overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        run_dir = run(cfg)
    finally:
        torch.set_num_threads(threads)
    check = check_demo(run_dir.root)
    wall = time.perf_counter() - t0
    print()
    where = "shipped with overmem" if shipped else f"{t_base:.0f} s, cached"
    shown = os.path.relpath(base) if not os.path.relpath(base).startswith("..") else str(base)
    print(f"overmem demo finished in {wall:.0f} s (base model: {where}, in {shown})")
    print(f"test accuracy: best {check.best_accuracy:.3f}, last {check.last_accuracy:.3f}; "
          f"test perplexity: min {check.min_ppl:.3f}, last {check.last_ppl:.3f} ({check.ppl_ratio:.2f}x)")
    for what, ok in check.passed.items():
        print(f"  [{'x' if ok else ' '}] {what}")
    print(f"figure: {run_dir.figure.with_suffix('.png')}  (and .svg)")
    if run_dir.report.exists():
        print(f"report: {run_dir.report}  (open it in a browser)")
    print(f"results: {run_dir.dynamics}, {run_dir.selection}, {run_dir.phases}")
    return {"run_dir": run_dir.root, "check": check, "seconds": wall}


REBUILD_COMMAND = "python -m overmem.demo --rebuild-base"


def rebuild_base(out_dir: str | Path = SHIPPED_BASE, pretrain: PretrainConfig = DEMO_PRETRAIN,
                 progress: bool = True) -> Path:
    """Pretrain the demo's base with `pretrain` into `out_dir` (default: the shipped base's folder,
    replaced) and write its build.json, recording the command that makes it again."""
    command = REBUILD_COMMAND
    if Path(out_dir).resolve() != SHIPPED_BASE:
        command += f" --out {out_dir}"
    if pretrain.steps != DEMO_PRETRAIN.steps:
        command += f" --pretrain-steps {pretrain.steps}"
    return build_base(Path(out_dir), pretrain, command, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """`python -m overmem.demo --rebuild-base [--out DIR] [--pretrain-steps N]`."""
    ap = argparse.ArgumentParser(prog="python -m overmem.demo", description="Rebuild the demo's shipped tiny base.")
    ap.add_argument("--rebuild-base", action="store_true", required=True,
                    help="pretrain the demo's base again (about 8 min on 2 cores) into --out")
    ap.add_argument("--out", default=str(SHIPPED_BASE), help="folder to write (default: the shipped base's, replaced)")
    ap.add_argument("--pretrain-steps", type=int, default=DEMO_PRETRAIN.steps, metavar="N",
                    help=f"optimizer steps (default {DEMO_PRETRAIN.steps}: the shipped base's)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        pretrain = demo_pretrain(args.pretrain_steps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out}: not a folder", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    folder = rebuild_base(out, pretrain, progress=not args.quiet)
    record = json.loads((folder / "build.json").read_text())
    print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s: {record['parameters']} parameters, "
          f"model.safetensors sha256 {record['sha256']['model.safetensors'][:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
