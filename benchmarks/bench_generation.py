"""Batched greedy generation against one-example-at-a-time `generate` on a tiny model.

    python benchmarks/bench_generation.py [--batch 16] [--n 32] [--new 64]

Prints both wall times and the speed-up (goal: >= 4x at batch 16). Stopping at the answer
line is off on both sides so that they decode the same number of tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import make_char_tokenizer, tiny_llama, toy_examples  # noqa: E402
from overmem.data.example import format_prompt  # noqa: E402
from overmem.generation import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = make_char_tokenizer()
    model = tiny_llama(len(tok))
    prompts = [format_prompt(e.question) for e in toy_examples(args.n)]
    kw = dict(max_new_tokens=args.new, stop_at_answer=False)
    generate(model, tok, prompts[:2], batch_size=2, **kw)  # warm-up

    t0 = time.perf_counter()
    single = generate(model, tok, prompts, batch_size=1, **kw)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = generate(model, tok, prompts, batch_size=args.batch, **kw)
    t_batched = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(single, batched))
    print(f"prompts={args.n} new tokens={args.new}")
    print(f"one at a time : {t_single:.2f} s")
    print(f"batch {args.batch:<7}: {t_batched:.2f} s")
    print(f"speed-up (goal >= 4x): {t_single / t_batched:.2f}x   identical outputs: {same}/{args.n}")


if __name__ == "__main__":
    main()
