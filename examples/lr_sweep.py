"""Learning-rate sweep on the built-in synthetic task (paper sec. 4.1: a larger learning rate brings
the onset of over-memorization earlier).

    python examples/lr_sweep.py [--lrs 1e-4 3e-4 1e-3] [--epochs 30] [--out runs/lr-sweep]

Each learning rate is one `overmem demo` run (same cached tiny base, same data, same seed; only
`train.lr` differs) in OUT/lr-<value>/. The runs are overlaid in OUT/lr_sweep.png (and .svg), and
a table gives, per learning rate, the first epoch whose test perplexity is 1.5x its minimum so far
(`ppl onset`), the first epoch the phase rule labels over-memorized (`onset`), accuracies and the
wall time; a second table gives, per learning rate, the first epoch the test perplexity and the
mean rank of the reference tokens each reach 1.5x their minimum so far, and the greedy agreement
and entropy at the perplexity's minimum and at the last epoch (docs/over-memorization.md).
`overmem report OUT/lr-*` puts the runs side by side in one HTML page.
Re-running resumes: finished runs are not recomputed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from overmem.demo import DEMO_PRETRAIN, DEMO_THREADS, check_demo, demo_config
from overmem.phases import detect_phases
from overmem.pipeline import run
from overmem.plotting import plot_runs
from overmem.results import RunDir
from overmem.tiny import get_tiny_base


def _epoch(report, checkpoint: str | None) -> str:
    return "-" if checkpoint is None else f"{report.get(checkpoint).epoch:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/lr-sweep")
    args = ap.parse_args()

    base = get_tiny_base(DEMO_PRETRAIN)
    torch.set_num_threads(DEMO_THREADS)  # as the demo: the same figures on every machine (docs/commands/demo.md)
    out = Path(args.out)
    runs, lines, signals = {}, [], []
    for lr in args.lrs:
        t0 = time.perf_counter()
        cfg = demo_config(base, out / f"lr-{lr:g}", seed=args.seed, epochs=args.epochs, quiet=True,
                          overrides=[f"train.lr={lr}"])
        run_dir = run(cfg)
        wall = time.perf_counter() - t0
        rows = run_dir.read_dynamics()
        runs[f"lr {lr:g}"] = rows
        report = detect_phases(rows, "test")
        check = check_demo(run_dir.root)
        lines.append(f"{lr:>8g} {_epoch(report, report.ppl_onset):>10} {_epoch(report, report.onset):>6} "
                     f"{check.best_accuracy:>8.2f} {check.last_accuracy:>8.2f} {check.ppl_ratio:>9.2f}x "
                     f"{wall:>7.0f} s")
        signals.append(f"{lr:>8g} " + signal_line(rows))
        print(f"lr {lr:g} done in {wall:.0f} s", flush=True)
    figures = plot_runs(runs, out, title="synthetic task: learning-rate sweep", name="lr_sweep")
    print(f"\n{'lr':>8} {'ppl onset':>10} {'onset':>6} {'best acc':>8} {'last acc':>8} {'last/min ppl':>10} {'wall':>9}")
    print("\n".join(lines))
    print("\nthe cheap signals on test (docs/over-memorization.md): the first epoch each is 1.5x its minimum so far;")
    print("greedy agreement and entropy at the perplexity minimum -> last epoch")
    print(f"{'lr':>8} {'ppl 1.5x':>9} {'rank 1.5x':>9} {'agreement':>15} {'entropy':>15}")
    print("\n".join(signals))
    print(f"figure: {figures[0]}")


def first_rise(rows: list[dict], key: str, factor: float = 1.5) -> str:
    """The first epoch whose `key` is at least `factor` x its minimum over the epochs before it
    ("-": none), the rule the phase rule applies to the perplexity."""
    low = None
    for row in rows:
        value = row[key]
        if low is not None and value >= factor * low:
            return f"{row['epoch']:g}"
        low = value if low is None else min(low, value)
    return "-"


def signal_line(rows: list[dict]) -> str:
    test = sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["epoch"])
    best = min(test, key=lambda r: r["ppl"])
    last = test[-1]
    return (f"{first_rise(test, 'ppl'):>9} {first_rise(test, 'rank_token'):>9} "
            f"{best['top1_token']:>6.3f} -> {last['top1_token']:.3f} {best['entropy_token']:>6.3f} -> "
            f"{last['entropy_token']:.3f}")


if __name__ == "__main__":
    main()
