"""Peak memory of the Min-K%++ token statistics: chunked `score_batch(vocab_stats=True)` against the naive
full (B, T, V) float32 log-softmax, on one long sequence with a large vocabulary.

    python benchmarks/bench_minkpp.py [--vocab 32000] [--length 2048] [--chunk 256] [--device cpu]

Each variant runs in a fresh subprocess; the peak is the high-water mark of resident memory
(CPU: /proc VmHWM, reset just before the measured call) or `torch.cuda.max_memory_allocated`
(CUDA), minus what was in use before the call. "forward" is the model call alone: the logits
it returns are the floor that neither variant can go below.

On CPU the chunked variant's number depends on reusing its buffers: allocating and freeing a
chunk-sized tensor per chunk fragments glibc's heap, which measured here at 500-600 MiB above
the forward pass (T=2048, V=32000) instead of the ~65 MiB of two reused 256 x V buffers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import tiny_llama  # noqa: E402
from overmem.data.encoding import IGNORE  # noqa: E402
from overmem.scoring import score_batch  # noqa: E402

MODES = ("forward", "naive", "chunked")


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


@torch.inference_mode()
def _naive(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[:, :-1]  # (B, T-1, V) float32
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * logp.square()).sum(-1) - mu.square()).sqrt()
    target = labels[:, 1:]
    keep = target != IGNORE
    return logp[keep].gather(-1, target[keep][:, None]).squeeze(-1), mu[keep], sigma[keep]


@torch.inference_mode()
def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = tiny_llama(args.vocab, hidden=args.hidden, layers=args.layers).to(device, getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.length), generator=g).to(device)
    labels = ids.clone()
    labels[:, : args.length // 8] = IGNORE  # a short prompt, as in SFT data
    id_rows, label_rows = ids.tolist(), labels.tolist()  # score_batch's input, built outside the measurement
    run = {
        "forward": lambda: _forward(model, ids),
        "naive": lambda: _naive(model, ids, labels),
        "chunked": lambda: score_batch(model, id_rows, label_rows, 0, vocab_stats=True, chunk_size=args.chunk),
    }[args.mode]
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _vm_kib("VmRSS") * 1024
        _reset_cpu_peak()
    t0 = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _vm_kib("VmHWM") * 1024
    del out
    print(json.dumps({"mode": args.mode, "peak_bytes": peak - before, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # set for the measuring subprocess
    args = ap.parse_args()
    if args.mode:
        child(args)
        return

    results = {}
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_mib = args.batch * args.length * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
    print(f"B={args.batch} T={args.length} V={args.vocab} dtype={args.dtype} chunk={args.chunk} device={args.device}")
    print(f"logits alone would be {logits_mib:.0f} MiB")
    for mode in MODES:
        r = results[mode]
        print(f"{mode:8s} peak {r['peak_bytes'] / 2**20:8.0f} MiB  time {r['seconds']:.2f} s")
    naive, chunked, floor = (results[m]["peak_bytes"] for m in ("naive", "chunked", "forward"))
    print(f"peak ratio naive / chunked: {naive / chunked:.2f}x")
    naive_extra, chunked_extra = (max(m - floor, 0) / 2**20 for m in (naive, chunked))
    if chunked_extra < 1:
        print(f"memory above the forward pass: naive {naive_extra:.0f} MiB, chunked none "
              "(its buffers fit under the forward pass's own peak)")
    else:
        print(f"memory above the forward pass: naive {naive_extra:.0f} MiB, chunked {chunked_extra:.0f} MiB "
              f"({naive_extra / chunked_extra:.1f}x)")


if __name__ == "__main__":
    main()
