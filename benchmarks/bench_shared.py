"""Scoring with the batch's shared opening run once, against every row running it.

    python benchmarks/bench_shared.py RUN [--names base epoch-6 ...] [--splits validation test]
                                          [--rounds 3]

RUN is a finished run folder (e.g. one `overmem run examples/smollm2/overmem.yaml` wrote). Each
named checkpoint (the base model for `base`) scores each split as tracking does
(`overmem.scoring.score_examples` with greedy tokens, the run's `eval.batch_size`), once as
overmem does (the tokens every row of a batch begins with run once, where they are at least
`hf_backend.SHARED_MIN`) and once with every row running them, rotating which goes first,
`--rounds` times, after one untimed batch. Printed per checkpoint: the median wall time of each
and their ratio, the tokens shared per batch, the largest difference of a reference token's
log-prob between the two, and how many examples' greedy tokens and ranks are the same in both.
Timings are wall times on whatever cores the machine has (set `OMP_NUM_THREADS`); compare the
ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import known_splits, open_checkpoint, open_run, run_checkpoints  # noqa: E402
from overmem import hf_backend  # noqa: E402
from overmem.backends import as_backend  # noqa: E402
from overmem.hf_backend import HfBackend  # noqa: E402
from overmem.scoring import score_examples  # noqa: E402

LABELS = ("shared", "every row")
SHARED = []  # tokens shared in each batch of the latest scoring


def count_shared() -> None:
    real = HfBackend._shared

    def shared(self, ids, first):
        n = real(self, ids, first)
        SHARED.append(n)
        return n

    HfBackend._shared = shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--names", nargs="*", default=["base", "epoch-6"], help="checkpoints (base: the base model)")
    ap.add_argument("--splits", nargs="*", default=None, help="tracked splits (default: all)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    count_shared()
    cfg, tokenizer, tracked = open_run(args.run)
    splits = args.splits or list(tracked)
    known_splits(ap, tracked, splits)
    _, paths, names = run_checkpoints(ap, args.run, args.names)
    examples = [ex for split in splits for ex in tracked[split]]
    minimum = hf_backend.SHARED_MIN
    print(f"splits {', '.join(splits)} ({len(examples)} examples); batches of {cfg.eval.batch_size}; "
          f"median of {args.rounds} rounds")
    print("checkpoint  " + "  ".join(f"{label + ' s':>12}" for label in LABELS)
          + "  ratio  shared tokens per batch  max |logprob diff|  same greedy and ranks")
    for name in names:
        backend = as_backend(open_checkpoint(cfg, paths, name))
        times = {label: [] for label in LABELS}
        scores = {}
        shared = []
        # Untimed: the process's first pass pays one-time costs (allocations, kernel choices).
        score_examples(backend, tokenizer, examples[: cfg.eval.batch_size], batch_size=cfg.eval.batch_size,
                       max_length=cfg.train.max_length, greedy=True)
        for r in range(args.rounds):
            for label in LABELS[r % 2:] + LABELS[: r % 2]:  # each goes first in turn
                hf_backend.SHARED_MIN = minimum if label == "shared" else 10**9
                SHARED.clear()
                t0 = time.perf_counter()
                scores[label] = score_examples(backend, tokenizer, examples, batch_size=cfg.eval.batch_size,
                                               max_length=cfg.train.max_length, greedy=True)
                times[label].append(time.perf_counter() - t0)
                if label == "shared":
                    shared = list(SHARED)
        hf_backend.SHARED_MIN = minimum
        pairs = list(zip(*(scores[label] for label in LABELS)))
        diff = max((float((a.logprobs - b.logprobs).abs().max()) for a, b in pairs if a.n_tokens), default=0.0)
        same = sum(a.greedy is not None and b.greedy is not None and bool((a.greedy == b.greedy).all())
                   and bool((a.ranks == b.ranks).all()) for a, b in pairs)
        total = [statistics.median(times[label]) for label in LABELS]
        print(f"{name:>10}  " + "  ".join(f"{t:12.2f}" for t in total) + f"  {total[1] / total[0]:5.2f}  "
              f"{statistics.mean(shared) if shared else 0:23.1f}  {diff:18.2e}  {same:>10d} of {len(pairs)}",
              flush=True)


if __name__ == "__main__":
    main()
