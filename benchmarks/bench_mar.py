"""Step-time overhead of the MAR loss over plain cross-entropy (goal: <= 5%).

    python benchmarks/bench_mar.py [--batch 8] [--steps 6]

Both sides run forward + backward + AdamW step on the same model, batches and seed; plain CE
uses the model's own loss, MAR computes (1 - p)-weighted token CE from the logits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import make_char_tokenizer, paired_median_times, tiny_llama, toy_examples  # noqa: E402
from overmem.data.encoding import IGNORE, encode_example, pad_right  # noqa: E402
from overmem.train.losses import weighted_token_ce  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per timed call")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = make_char_tokenizer()
    model = tiny_llama(len(tok)).train()
    enc = [encode_example(tok, e, max_length=1024, add_eos=True) for e in toy_examples(args.batch * args.steps)]
    batches = [
        (pad_right([e.ids for e in enc[i : i + args.batch]], tok.pad_token_id),
         pad_right([e.labels for e in enc[i : i + args.batch]], IGNORE))
        for i in range(0, len(enc), args.batch)
    ]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def steps(mar: bool) -> None:
        for ids, labels in batches:
            if mar:
                loss = weighted_token_ce(model(input_ids=ids).logits, labels, gamma=1.0)
            else:
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    t_ce, t_mar = paired_median_times(lambda: steps(False), lambda: steps(True))
    print(f"batch={args.batch} steps per call={args.steps}")
    print(f"plain CE : {t_ce / args.steps * 1000:8.1f} ms/step")
    print(f"MAR      : {t_mar / args.steps * 1000:8.1f} ms/step")
    print(f"overhead (goal <= 5%): {(t_mar / t_ce - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
