"""Batches cut into the passes that spare the most padding, against one pass per batch.

    python benchmarks/bench_passes.py RUN [--names base epoch-6 ...] [--generation-batch-size 100]
                                          [--rounds 3]

RUN is a finished run folder (e.g. one `overmem demo` wrote). Each named checkpoint (the base model
for `base`) evaluates every tracked split as tracking does (`overmem.dynamics.evaluate_examples`:
the scoring pass, then greedy generation with the previous checkpoint's generations in RUN as
drafts), in turn:

- "whole": each scoring and verification batch in one forward pass (`hf_backend.PASS_TOKENS`
  so large that no batch is cut), the run's batch sizes;
- "cut": batches cut where the padding spared costs more than a pass (`hf_backend._cut`), the
  run's batch sizes;
- with `--generation-batch-size N`, "cut, N": as "cut", with N generations a batch.

The order rotates each round, `--rounds` times. Printed per checkpoint: the median wall time of
each and their ratios to "whole"; at the end the totals, whether every evaluation gave the same
generations as the first, and how far an example's summed negative log-likelihood moved. Timings
are wall times on whatever cores the machine has (set `OMP_NUM_THREADS`); compare the ratios,
measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import open_checkpoint, open_run, previous_generations, run_checkpoints  # noqa: E402
from overmem import hf_backend  # noqa: E402
from overmem.backends import as_backend  # noqa: E402
from overmem.dynamics import evaluate_examples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--names", nargs="*", default=["base", "epoch-6"], help="checkpoints (base: the base model)")
    ap.add_argument("--generation-batch-size", type=int, default=None,
                    help="also cut, with this many generations a batch")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.generation_batch_size is not None and args.generation_batch_size < 1:
        ap.error(f"--generation-batch-size must be at least 1, got {args.generation_batch_size}")
    cfg, tokenizer, tracked = open_run(args.run)
    order, paths, names = run_checkpoints(ap, args.run, args.names)
    cut = hf_backend.PASS_TOKENS
    # label -> (PASS_TOKENS, generations a batch)
    variants = {"whole": (10**9, cfg.generation.batch_size), "cut": (cut, cfg.generation.batch_size)}
    if args.generation_batch_size is not None:
        variants[f"cut, {args.generation_batch_size}"] = (cut, args.generation_batch_size)
    labels = list(variants)
    print(f"splits {', '.join(tracked)}; scoring batches of {cfg.eval.batch_size}, generation batches of "
          f"{cfg.generation.batch_size}; PASS_TOKENS {cut}; median of {args.rounds} rounds")
    print("checkpoint  " + "  ".join(f"{label + ' s':>12}" for label in labels)
          + "  " + "  ".join(f"{'ratio ' + label:>12}" for label in labels[1:]))
    totals = dict.fromkeys(labels, 0.0)
    same, first, drift = True, {}, 0.0
    for name in names:
        backend = as_backend(open_checkpoint(cfg, paths, name))
        drafts = previous_generations(args.run, order, name, list(tracked))
        times = {label: [] for label in labels}
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:  # each goes first in turn
                hf_backend.PASS_TOKENS, batch = variants[label]
                gen_cfg = cfg.generation.model_copy(update={"batch_size": batch})
                t0 = time.perf_counter()
                got = [evaluate_examples(backend, tokenizer, tracked[split], eval_cfg=cfg.eval, gen_cfg=gen_cfg,
                                         max_length=cfg.train.max_length, quiet=True, drafts=drafts[split])
                       for split in tracked]
                times[label].append(time.perf_counter() - t0)
                gens = [[(s["id"], s.get("generation_ids")) for s in rows] for rows in got]
                nll = [s["nll_sum"] for rows in got for s in rows]
                first.setdefault(name, (gens, nll))
                same = same and gens == first[name][0]
                drift = max([drift] + [abs(a - b) for a, b in zip(nll, first[name][1])])
        hf_backend.PASS_TOKENS = cut
        med = {label: statistics.median(times[label]) for label in labels}
        for label in labels:
            totals[label] += med[label]
        print(f"{name:>10}  " + "  ".join(f"{med[label]:12.2f}" for label in labels) + "  "
              + "  ".join(f"{med['whole'] / med[label]:12.2f}" for label in labels[1:]), flush=True)
    print(f"{'total':>10}  " + "  ".join(f"{totals[label]:12.2f}" for label in labels) + "  "
          + "  ".join(f"{totals['whole'] / totals[label]:12.2f}" for label in labels[1:]))
    print(f"the same generations in every evaluation: {same}; largest difference of an example's summed "
          f"negative log-likelihood from the first evaluation's: {drift:.2e}")


if __name__ == "__main__":
    main()
