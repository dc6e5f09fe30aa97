"""Wall time of `overmem demo` and what it shows, for several seeds.

    python benchmarks/bench_demo.py [--seeds 0 1 2] [--cold] [--pretrain-steps N]

`--cold` uses an empty cache, so the first seed includes pretraining the tiny base; later seeds
reuse it. Prints, per seed, the wall time and the demo's four checks (goal: at most 5 minutes
on a 2-core machine, never more than 10).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overmem.demo import DEMO_PRETRAIN, demo_pretrain, run_demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cold", action="store_true", help="start from an empty model cache")
    ap.add_argument("--pretrain-steps", type=int, default=DEMO_PRETRAIN.steps, help="the tiny base's pretraining steps")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cold:
            os.environ["OVERMEM_CACHE"] = str(Path(tmp) / "cache")
        for seed in args.seeds:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                result = run_demo(Path(tmp) / f"demo-{seed}", seed=seed, quiet=True,
                                  pretrain=demo_pretrain(args.pretrain_steps))
            wall = time.perf_counter() - t0
            c = result["check"]
            marks = " ".join("pass" if ok else "FAIL" for ok in c.passed.values())
            print(f"seed {seed}: {wall:6.0f} s  best acc {c.best_accuracy:.3f}  last acc {c.last_accuracy:.3f}  "
                  f"ppl {c.min_ppl:.3f} -> {c.last_ppl:.3f} ({c.ppl_ratio:.2f}x)  checks: {marks}")
    print("checks: best acc >= 0.60 | last ppl >= 2x min | last acc within 5 points of best | late epochs over-memorized")


if __name__ == "__main__":
    main()
