"""Mitigations on the built-in synthetic task (paper sec. 6.2-6.3): memorization-aware reweighting
(MAR) against plain cross-entropy, and the merge of an early and a late checkpoint against each.

    python examples/mitigations.py [--epochs 30] [--seed 0] [--out runs/mitigations]

1. Two demo runs that differ only in `train.loss` (ce, mar): OUT/ce, OUT/mar.
2. In each, the checkpoint with the lowest test perplexity ("early") and the last one ("late") are
   merged with equal weights, theta_base + mean_i (theta_i - theta_base), tracked like a checkpoint
   (`merge(epoch-a,epoch-b)` in dynamics.jsonl).
3. `overmem analyze --suite ood` on early, late and merged: accuracy on the in-distribution test set
   and the four synthetic OOD variants, with bootstrap intervals.
Prints both tables. Re-running resumes; nothing finished is recomputed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from overmem.analysis.suite import analyze, format_table
from overmem.demo import DEMO_PRETRAIN, DEMO_THREADS, demo_config
from overmem.merge import merge_name
from overmem.phases import detect_phases
from overmem.pipeline import run
from overmem.results import RunDir
from overmem.tiny import get_tiny_base


def last_row(rows: list[dict], split: str) -> dict:
    return max((r for r in rows if r["split"] == split and r["epoch"] is not None), key=lambda r: r["epoch"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ood-size", type=int, default=100, help="examples per OOD set")
    ap.add_argument("--out", default="runs/mitigations")
    args = ap.parse_args()

    base = get_tiny_base(DEMO_PRETRAIN)
    torch.set_num_threads(DEMO_THREADS)  # as the demo: the same figures on every machine (docs/commands/demo.md)
    out = Path(args.out)
    summary = []
    for loss in ("ce", "mar"):
        t0 = time.perf_counter()
        overrides = [f"train.loss={loss}"]
        cfg = demo_config(base, out / loss, seed=args.seed, epochs=args.epochs, quiet=True, overrides=overrides)
        rows = run(cfg).read_dynamics()
        phases = detect_phases(rows, "test")
        early, late = phases.ppl_min_checkpoint, f"epoch-{args.epochs}"
        if early == late:
            raise SystemExit(f"{loss}: test perplexity is lowest at the last epoch; nothing to merge")
        # Same run folder, now with the merge group: training is done, only the merge is new.
        cfg = demo_config(base, out / loss, seed=args.seed, epochs=args.epochs, quiet=True,
                          overrides=overrides + [f"merge=[[{early},{late}]]"])
        rows = run(cfg).read_dynamics()
        merged = merge_name([early, late])
        test = {r["checkpoint"]: r for r in rows if r["split"] == "test"}
        epochs = [r for r in test.values() if r["epoch"] is not None]  # merged models have no epoch
        last = last_row(rows, "test")
        summary.append(
            f"{loss:>4} {min(r['ppl'] for r in epochs):>8.3f} {last['ppl']:>9.3f} "
            f"{last['accuracy']:>8.2f} {max(r['accuracy'] for r in epochs):>8.2f} "
            f"{test[merged]['ppl']:>10.3f} {test[merged]['accuracy']:>10.2f} {time.perf_counter() - t0:>6.0f} s")
        ood_cfg = cfg.model_copy(update={"analysis": cfg.analysis.model_copy(
            update={"ood": cfg.analysis.ood.model_copy(update={"size": args.ood_size})})})
        doc = analyze(RunDir(out / loss).root, [early, late, merged], ["ood"], ood_cfg)["ood"]
        print(f"\n[{loss}] accuracy of the early, late and merged checkpoints (overmem analyze --suite ood):")
        print(format_table(doc, [early, late, merged]))
    print(f"\n{'loss':>4} {'min ppl':>8} {'last ppl':>9} {'last acc':>8} {'best acc':>8} "
          f"{'merged ppl':>10} {'merged acc':>10} {'wall':>8}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
