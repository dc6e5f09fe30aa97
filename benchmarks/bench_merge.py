"""Peak memory of the streaming checkpoint merge against a naive merge of whole state dicts.

    python benchmarks/bench_merge.py [--hidden 512] [--layers 12] [--vocab 8000]

Builds a random Llama (~210 MB of fp32 safetensors with the defaults) and four full
checkpoints of it in a temporary folder, then merges 2 and 4 of them, each configuration in
its own subprocess: `overmem.merge.merge_checkpoints` (default shard size, and 50 MB shards)
and a naive merge that loads the base and all N state dicts at once (safetensors `load_file`),
computes eq. 1 and saves. Reported: the child's peak RSS during the merge minus its RSS before
(Linux VmHWM, reset after imports through /proc/self/clear_refs; `getrusage` ru_maxrss where that
is not possible), in MB and in model sizes, and the ratio naive / streaming (goal: streaming
stays near one output shard plus a few tensors whatever N is).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 2**20


def _status_bytes(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak() -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS, so import-time peaks do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _naive_merge(base: Path, ckpts: list[Path], out: Path) -> None:
    """What merging without streaming looks like: every state dict in memory at once."""
    from safetensors.torch import load_file, save_file

    theta_base = load_file(base / "model.safetensors")
    thetas = [load_file(c / "model.safetensors") for c in ckpts]
    w = 1.0 / len(thetas)
    merged = {k: v + sum(w * (t[k] - v) for t in thetas) for k, v in theta_base.items()}
    out.mkdir(parents=True)
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})


def child(method: str, base: Path, ckpts: list[Path], out: Path, shard_mb: int | None) -> None:
    """Run one merge and print {"baseline": bytes, "peak": bytes, "seconds": s} as JSON."""
    from overmem.merge import DEFAULT_SHARD_BYTES, merge_checkpoints

    torch.set_num_threads(2)
    baseline = _status_bytes("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    if method == "naive":
        _naive_merge(base, ckpts, out)
    else:
        shard = shard_mb * MB if shard_mb else DEFAULT_SHARD_BYTES
        merge_checkpoints(base, ckpts, out=out, max_shard_bytes=shard, progress=False)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))


def _run_child(method: str, base: Path, ckpts: list[Path], out: Path, shard_mb: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--base", str(base), "--out", str(out),
           "--ckpts", *map(str, ckpts)]
    if shard_mb:
        cmd += ["--shard-mb", str(shard_mb)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def build(root: Path, hidden: int, layers: int, vocab: int, n: int) -> tuple[Path, list[Path], int, int]:
    """A random Llama saved at root/base and n noisy full checkpoints of it; returns the bytes
    of the model and of its largest tensor."""
    from transformers.utils import logging

    from benchmarks.common import make_char_tokenizer, tiny_llama

    logging.disable_progress_bar()
    tok = make_char_tokenizer()
    model = tiny_llama(vocab, hidden=hidden, layers=layers)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    ckpts = []
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        model.save_pretrained(root / f"epoch-{i + 1}")
        tok.save_pretrained(root / f"epoch-{i + 1}")
        ckpts.append(root / f"epoch-{i + 1}")
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return root / "base", ckpts, (root / "base" / "model.safetensors").stat().st_size, largest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--child", choices=["stream", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ckpts", type=Path, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--shard-mb", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.base, args.ckpts, args.out, args.shard_mb)
        return

    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = Path(tmp)
        base, ckpts, model_bytes, largest = build(root, args.hidden, args.layers, args.vocab, n=4)
        print(f"model: hidden={args.hidden} layers={args.layers} vocab={args.vocab}, "
              f"{model_bytes / MB:.0f} MB of fp32 safetensors, largest tensor {largest / MB:.0f} MB")
        print(f"{'N':>2} {'method':<22} {'peak - baseline':>16} {'models':>7} {'time':>7}")
        for n in (2, 4):
            used = {}
            for label, method, shard in (("naive (all in memory)", "naive", None),
                                         ("streaming", "stream", None),
                                         ("streaming, 50 MB shards", "stream", 50)):
                out = root / f"out-{n}-{method}-{shard}"
                r = _run_child(method, base, ckpts[:n], out, shard)
                used[label] = r["peak"] - r["baseline"]
                print(f"{n:>2} {label:<22} {used[label] / MB:>13.0f} MB {used[label] / model_bytes:>7.2f} "
                      f"{r['seconds']:>6.1f}s")
            naive = used["naive (all in memory)"]
            print(f"   ratio naive / streaming: {naive / used['streaming']:.2f}x, "
                  f"naive / streaming with 50 MB shards: {naive / used['streaming, 50 MB shards']:.2f}x")


if __name__ == "__main__":
    main()
