"""Decoding resumed from the keys and values tracking keeps, against each row's input run again.

    python benchmarks/bench_resume.py RUN [--names epoch-1 epoch-6 ...] [--splits validation test]
                                          [--rounds 3]

RUN is a finished run folder (e.g. one `overmem demo` wrote). Each named checkpoint (the base model
for `base`) evaluates each split as tracking does (`overmem.dynamics.evaluate_examples`: the
scoring pass, then greedy generation with the previous checkpoint's generations in RUN as drafts),
once with `hf_backend.RESUME_KEPT` on (rows decoded after a draft's accepted prefix, or after their
prompt, start from the keys and values the scoring and verification passes kept) and once off (each
row's prompt + accepted prefix runs again before decoding), rotating which goes first, `--rounds`
times. Printed per checkpoint: the median wall time of the whole evaluation and of the decoding
alone for each, their ratios, the rows decoded, and whether every round's samples (generation
ids, scores) are identical.
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

from benchmarks.common import known_splits, open_checkpoint, open_run, previous_generations, run_checkpoints  # noqa: E402
from overmem import hf_backend  # noqa: E402
from overmem.backends import as_backend  # noqa: E402
from overmem.dynamics import evaluate_examples  # noqa: E402
from overmem.hf_backend import HfBackend  # noqa: E402

LABELS = ("resumed", "run again")
DECODING = {"seconds": 0.0, "rows": 0}  # the backend's decoding in the latest evaluation


def time_decoding() -> None:
    real = HfBackend.decode

    def decode(self, tokenizer, inputs, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(self, tokenizer, inputs, *args, **kwargs)
        finally:
            DECODING["seconds"] += time.perf_counter() - t0
            DECODING["rows"] += len(inputs)

    HfBackend.decode = decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--names", nargs="*", default=["epoch-1", "epoch-6"], help="checkpoints (base: the base model)")
    ap.add_argument("--splits", nargs="*", default=["validation", "test"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    time_decoding()
    cfg, tokenizer, tracked = open_run(args.run)
    known_splits(ap, tracked, args.splits)
    order, paths, names = run_checkpoints(ap, args.run, args.names)
    print(f"splits {', '.join(args.splits)}; batches of {cfg.generation.batch_size}; median of {args.rounds} rounds")
    print("checkpoint  " + "  ".join(f"{label + ' s':>12}" for label in LABELS) + "  ratio  "
          + "  ".join(f"{'decode ' + label + ' s':>19}" for label in LABELS) + "  ratio  rows decoded  identical")
    for name in names:
        backend = as_backend(open_checkpoint(cfg, paths, name))
        drafts = previous_generations(args.run, order, name, args.splits)
        times = {label: [] for label in LABELS}
        decoding = {label: [] for label in LABELS}
        first, same, rows = None, True, 0
        for r in range(args.rounds):
            for label in LABELS[r % 2:] + LABELS[: r % 2]:  # each goes first in turn
                hf_backend.RESUME_KEPT = label == "resumed"
                DECODING.update(seconds=0.0, rows=0)
                t0 = time.perf_counter()
                got = [evaluate_examples(backend, tokenizer, tracked[split], eval_cfg=cfg.eval, gen_cfg=cfg.generation,
                                         max_length=cfg.train.max_length, quiet=True, drafts=drafts[split])
                       for split in args.splits]
                times[label].append(time.perf_counter() - t0)
                decoding[label].append(DECODING["seconds"])
                rows = DECODING["rows"]
                kept = [[(s["id"], s.get("generation_ids"), s["nll_sum"]) for s in samples] for samples in got]
                first = kept if first is None else first
                same = same and kept == first
        hf_backend.RESUME_KEPT = True
        total = [statistics.median(times[label]) for label in LABELS]
        dec = [statistics.median(decoding[label]) for label in LABELS]
        print(f"{name:>10}  " + "  ".join(f"{t:12.2f}" for t in total) + f"  {total[1] / total[0]:5.2f}  "
              + "  ".join(f"{t:19.2f}" for t in dec) + f"  {dec[1] / max(dec[0], 1e-9):5.2f}  {rows:12d}  {same}",
              flush=True)


if __name__ == "__main__":
    main()
