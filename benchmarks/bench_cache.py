"""Greedy decoding with each Hugging Face decoding (`generation.cache`: overmem's pruned loop,
transformers' static and dynamic KV caches), or with other decoding batch sizes, on a run's checkpoints.

    python benchmarks/bench_cache.py RUN [--names epoch-1 epoch-6 ...] [--split test] [--rounds 3]
                                         [--drafts [--sizing]] [--batch-sizes 16 64 ...]

RUN is a finished run folder (e.g. one `overmem demo` wrote). Each named checkpoint (the base model
for `base`) generates greedily for the split's prompts with the run's generation settings, once
with each of `generation.cache: pruned`, `static` and `dynamic` (with `--batch-sizes`: once per
`generation.batch_size` given, with the run's cache), rotating which goes first, `--rounds` times;
with `--drafts`, the previous checkpoint's generations in RUN are its drafts, so that only the
rows that disagree are decoded (from where they disagree), as tracking decodes; with `--sizing`
too, the static cache sized by the drafts' lengths (`hf_backend.EXPECTED_SLACK`) against the
static cache sized for `max_new_tokens`. Printed per checkpoint: the median wall time of each
setting, each one's ratio to the first, the rows decoded, and whether every round's outputs are
identical.
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
from overmem.data.example import format_prompt  # noqa: E402
from overmem.generation import generate_greedy  # noqa: E402
from overmem import hf_backend  # noqa: E402
from overmem.hf_backend import HfBackend  # noqa: E402

CACHES = ("pruned", "static", "dynamic")
DECODED = [0]  # rows the backend decoded in the latest call


def count_decoded_rows() -> None:
    real = HfBackend.decode

    def decode(self, tokenizer, inputs, *args, **kwargs):
        DECODED[0] += len(inputs)
        return real(self, tokenizer, inputs, *args, **kwargs)

    HfBackend.decode = decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--names", nargs="*", default=["base", "epoch-1"], help="checkpoints (base: the base model)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--drafts", action="store_true", help="the previous checkpoint's generations as drafts")
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=[],
                    help="compare these decoding batch sizes (with the run's cache) instead of the two caches")
    ap.add_argument("--sizing", action="store_true",
                    help="with --drafts: the static cache sized by the drafts' lengths against one sized for "
                         "max_new_tokens, instead of the two caches")
    args = ap.parse_args()
    if args.sizing and not args.drafts:
        ap.error("--sizing compares what the drafts' lengths do: add --drafts")
    count_decoded_rows()
    cfg, tokenizer, tracked = open_run(args.run)
    known_splits(ap, tracked, [args.split])
    examples = tracked[args.split]
    prompts = [format_prompt(ex.question) for ex in examples]
    order, paths, names = run_checkpoints(ap, args.run, args.names)
    gen = cfg.generation
    settings = ({f"batch {b}": {"batch_size": b, "cache": gen.cache} for b in args.batch_sizes} if args.batch_sizes
                else {cache: {"batch_size": gen.batch_size, "cache": cache} for cache in CACHES})
    slack = {label: hf_backend.EXPECTED_SLACK for label in settings}
    if args.sizing:  # a slack past every limit: each batch's cache is sized for max_new_tokens
        settings = {label: {"batch_size": gen.batch_size, "cache": "static"} for label in ("sized", "full")}
        slack = {"sized": hf_backend.EXPECTED_SLACK, "full": gen.max_new_tokens + 1}
    labels = list(settings)
    print(f"{len(prompts)} {args.split} prompts, up to {gen.max_new_tokens} new tokens, "
          + (f"cache {gen.cache}" if args.batch_sizes else f"batches of {gen.batch_size}"))
    print("checkpoint  " + "  ".join(f"{label + ' s':>10}" for label in labels)
          + "  " + "  ".join(f"{label + '/' + labels[0]:>16}" for label in labels[1:]) + "  rows decoded  identical")
    for name in names:
        model = open_checkpoint(cfg, paths, name)
        previous = previous_generations(args.run, order, name, [args.split])[args.split] if args.drafts else None
        drafts = [previous.get(ex.id) for ex in examples] if previous is not None else None
        kw = dict(drafts=drafts, max_new_tokens=gen.max_new_tokens,
                  stop_at_answer=[gen.stop_at_answer and ex.has_answer_line for ex in examples],
                  max_prompt_tokens=cfg.train.max_length)
        times: dict[str, list[float]] = {label: [] for label in labels}
        first: list[list[int]] | None = None
        same = True  # every round's output, of every setting, is the first one's
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:  # each goes first in turn
                DECODED[0] = 0
                hf_backend.EXPECTED_SLACK = slack[label]
                t0 = time.perf_counter()
                got = [c.ids for c in generate_greedy(model, tokenizer, prompts, **settings[label], **kw)]
                times[label].append(time.perf_counter() - t0)
                first = got if first is None else first
                same = same and got == first
        medians = [statistics.median(times[label]) for label in labels]
        print(f"{name:>10}  " + "  ".join(f"{m:10.2f}" for m in medians) + "  "
              + "  ".join(f"{m / medians[0]:16.2f}" for m in medians[1:]) + f"  {DECODED[0]:12d}  {same}", flush=True)


if __name__ == "__main__":
    main()
