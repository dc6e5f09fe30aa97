"""Perplexity scoring throughput against a bare `model(input_ids)` forward on the same batches.

    python benchmarks/bench_scoring.py [--batch 8] [--n 64]

Prints tokens/s of both and their ratio (goal: >= 0.9). Both sides see identical padded
batches; the difference is the cost of selecting response positions and the log-softmax.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import make_char_tokenizer, paired_median_times, tiny_llama, toy_examples  # noqa: E402
from overmem.data.encoding import encode_example, pad_right  # noqa: E402
from overmem.scoring import score_examples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = make_char_tokenizer()
    model = tiny_llama(len(tok))
    examples = toy_examples(args.n)
    encoded = sorted((encode_example(tok, e, max_length=2048, add_eos=False)[0] for e in examples), key=len)
    batches = [pad_right(encoded[i : i + args.batch], tok.pad_token_id) for i in range(0, len(encoded), args.batch)]
    n_tokens = sum(b.numel() for b in batches)

    @torch.inference_mode()
    def bare() -> None:
        for ids in batches:
            model(input_ids=ids)

    def ours() -> None:
        score_examples(model, tok, examples, batch_size=args.batch)

    t_bare, t_ours = paired_median_times(bare, ours, repeats=9)
    print(f"examples={args.n} batch={args.batch} padded tokens={n_tokens}")
    print(f"bare forward : {n_tokens / t_bare:10.0f} tok/s ({t_bare:.3f} s)")
    print(f"score_examples: {n_tokens / t_ours:10.0f} tok/s ({t_ours:.3f} s)")
    print(f"ratio (goal >= 0.9): {t_bare / t_ours:.3f}")


if __name__ == "__main__":
    main()
