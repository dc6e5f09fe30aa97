"""Verifying drafts after the prompts the scoring pass kept, against running each prompt again.

    python benchmarks/bench_verify.py RUN [--names epoch-30 epoch-31 ...] [--rounds 2]

RUN is a finished run folder (e.g. one `overmem demo` wrote) whose samples hold its generations.
Each named checkpoint evaluates every tracked split as tracking does (`dynamics.evaluate_examples`,
`generation.reuse_drafts` on), the generations of the checkpoint before it in RUN as drafts: once
within `HfBackend.keeping_prompts` ("kept": the drafts verified over themselves alone, after the
keys and values of the prompts scoring ran) and once with nothing kept ("again": verification runs
prompt + draft), alternating which goes first, `--rounds` times. Printed per checkpoint: the
median wall time of each, their ratio, the time spent scoring, verifying and decoding in the
"kept" and "again" evaluations, and whether every row (scores, generations, draft counts) is the
same in both and every generation the one RUN wrote.

Timings are wall times on whatever cores the machine has (set `OMP_NUM_THREADS`); compare the
ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overmem.config import apply_overrides, config_from_dict, read_yaml  # noqa: E402
from overmem.data.splits import derive_splits  # noqa: E402
from overmem.dynamics import evaluate_examples  # noqa: E402
from overmem.hf_backend import HfBackend  # noqa: E402
from overmem.models import load_checkpoint, load_tokenizer  # noqa: E402
from overmem.results import BASE, RunDir, find_checkpoints, read_jsonl  # noqa: E402

STAGES = ("score", "verify", "decode")
SECONDS: dict[str, float] = defaultdict(float)  # stage -> seconds, in the evaluation being timed


def install_timers() -> None:
    """Add the wall time of `HfBackend.score`, `verify` and `decode` to SECONDS."""
    for stage in STAGES:
        real = getattr(HfBackend, stage)

        def timed(self, *args, _real=real, _stage=stage, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(self, *args, **kwargs)
            finally:
                SECONDS[_stage] += time.perf_counter() - t0

        setattr(HfBackend, stage, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--names", nargs="*", default=["epoch-30", "epoch-31"], help="checkpoints (not the base)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    run = RunDir(args.run)
    cfg = config_from_dict(apply_overrides(read_yaml(args.run / "config.yaml"), ["generation.reuse_drafts=true"]),
                           "bench config")
    tokenizer = load_tokenizer(cfg.model)
    tracked = derive_splits(cfg.data).tracked
    order = [BASE] + [c.name for c in find_checkpoints(args.run / "checkpoints")]
    paths = {c.name: c.path for c in find_checkpoints(args.run / "checkpoints")}
    unknown = [name for name in args.names if name not in paths]
    if unknown:
        ap.error(f"no checkpoint {', '.join(unknown)} in {args.run / 'checkpoints'} (have: {', '.join(order[1:])})")
    install_timers()
    keeping = HfBackend.keeping_prompts
    print(f"{sum(map(len, tracked.values()))} examples per checkpoint ({', '.join(tracked)}), "
          f"scoring batches of {cfg.eval.batch_size}, generation batches of {cfg.generation.batch_size}")
    print("checkpoint    kept s   again s  again/kept  kept: score + verify + decode s  "
          "again: score + verify + decode s  same rows  RUN's generations")
    for name in args.names:
        before = order[order.index(name) - 1]
        backend = HfBackend(load_checkpoint(paths[name], cfg.model))
        times: dict[str, list[float]] = {"kept": [], "again": []}
        stages: dict[str, dict[str, float]] = {"kept": defaultdict(float), "again": defaultdict(float)}
        rows: dict[str, list] = {}
        for r in range(args.rounds):
            for label in ("kept", "again") if r % 2 == 0 else ("again", "kept"):
                HfBackend.keeping_prompts = keeping if label == "kept" else lambda self: contextlib.nullcontext()
                SECONDS.clear()
                t0 = time.perf_counter()
                got = []
                for split, examples in tracked.items():
                    drafts = {s["id"]: s["generation_ids"] for s in read_jsonl(run.samples(before, split))
                              if s.get("generation_ids")}
                    got.append(evaluate_examples(backend, tokenizer, examples, eval_cfg=cfg.eval,
                                                 gen_cfg=cfg.generation, max_length=cfg.train.max_length,
                                                 quiet=True, drafts=drafts))
                times[label].append(time.perf_counter() - t0)
                for stage in STAGES:
                    stages[label][stage] += SECONDS[stage] / args.rounds
                rows.setdefault(label, got)
        HfBackend.keeping_prompts = keeping
        same = rows["kept"] == rows["again"]
        written = all(row["generation_ids"] == theirs.get(row["id"])
                      for split, mine in zip(tracked, rows["kept"])
                      for theirs in [{s["id"]: s.get("generation_ids") for s in read_jsonl(run.samples(name, split))}]
                      for row in mine if "generation_ids" in row)
        kept, again = (statistics.median(times[label]) for label in ("kept", "again"))
        parts = {label: " + ".join(f"{stages[label][s]:.2f}" for s in STAGES) for label in stages}
        print(f"{name:>10}  {kept:8.2f}  {again:8.2f}  {again / kept:10.2f}  {parts['kept']:>31}  "
              f"{parts['again']:>32}  {str(same):>9}  {written}", flush=True)


if __name__ == "__main__":
    main()
