"""Learning-rate sweep on the built-in synthetic task (paper sec. 4.1: a larger learning rate brings
the onset of over-memorization earlier).

    python examples/lr_sweep.py [--lrs 1e-4 3e-4 1e-3] [--epochs 30] [--out runs/lr-sweep]

Each learning rate is one `overmem demo` run (same cached tiny base, same data, same seed; only
`train.lr` differs) in OUT/lr-<value>/. The runs are overlaid in OUT/lr_sweep.png (and .svg), and
a table gives, per learning rate, the first epoch whose test perplexity is 1.5x its minimum so far
(`ppl onset`), the first epoch the phase rule labels over-memorized (`onset`), accuracies and the
wall time. `overmem report OUT/lr-*` puts the runs side by side in one HTML page.
Re-running resumes: finished runs are not recomputed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from overmem.demo import DEMO_PRETRAIN, check_demo, demo_config
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
    out = Path(args.out)
    runs, lines = {}, []
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
        print(f"lr {lr:g} done in {wall:.0f} s", flush=True)
    figures = plot_runs(runs, out, title="synthetic task: learning-rate sweep", name="lr_sweep")
    print(f"\n{'lr':>8} {'ppl onset':>10} {'onset':>6} {'best acc':>8} {'last acc':>8} {'last/min ppl':>10} {'wall':>9}")
    print("\n".join(lines))
    print(f"figure: {figures[0]}")


if __name__ == "__main__":
    main()
