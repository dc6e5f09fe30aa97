"""Wall time of `overmem demo` and what it shows, for several seeds, against the README's table.

    python benchmarks/bench_demo.py [--seeds 0 1 2] [--cold] [--pretrain-steps N]

The demo's base ships with overmem, so the default pretrains nothing. `--cold` uses an empty model
cache: with `--pretrain-steps` other than 1500 the first seed then includes pretraining that base
(later seeds reuse it). Prints, per seed, the wall time, the demo's figures and four checks (goal:
at most 5 minutes on a 2-core machine), and how far each figure is from the README's row for that
seed (the README's table is read, not copied: it is the one source of those figures).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overmem.demo import DEMO_PRETRAIN, demo_pretrain, run_demo  # noqa: E402


README = Path(__file__).resolve().parents[1] / "README.md"
# A row of the README's demo table: | 0 | 264 s | 0.995 / 0.965 | 1.373 -> 3.274 (2.38x) | 4 of 4 |
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(\d+) s\s*\|\s*([\d.]+) / ([\d.]+)\s*\|\s*([\d.]+) -> ([\d.]+) \(([\d.]+)x\)"
                  r"\s*\|\s*(\d) of 4\s*\|")


def readme_figures(text: str) -> dict[int, dict[str, float]]:
    """The README's demo table, per seed: wall seconds, best/last test accuracy, min/last test ppl,
    their ratio and the checks passed."""
    rows = {}
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            seed, wall, best, last, ppl_min, ppl_last, ratio, checks = m.groups()
            rows[int(seed)] = {"wall": float(wall), "best": float(best), "last": float(last), "min_ppl": float(ppl_min),
                               "last_ppl": float(ppl_last), "ratio": float(ratio), "checks": int(checks)}
    return rows


def difference(measured: dict[str, float], readme: dict[str, float] | None) -> str:
    """How far `measured` is from the README's row (measured minus README), as one line."""
    if readme is None:
        return "  (no README row for this seed)"
    if all(round(measured[k], 3) == readme[k] for k in ("best", "last", "min_ppl", "last_ppl")):
        same = "the README's figures exactly"
    else:
        same = "differs from the README"
    d = {k: measured[k] - readme[k] for k in readme}
    return (f"  vs README: {same}; best acc {d['best']:+.3f}, last acc {d['last']:+.3f}, "
            f"min ppl {d['min_ppl']:+.3f}, last ppl {d['last_ppl']:+.3f}, ratio {d['ratio']:+.2f}x, "
            f"checks {d['checks']:+.0f}, wall {d['wall']:+.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cold", action="store_true", help="start from an empty model cache")
    ap.add_argument("--pretrain-steps", type=int, default=DEMO_PRETRAIN.steps, help="the tiny base's pretraining steps")
    args = ap.parse_args()
    readme = readme_figures(README.read_text())
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
            measured = {"wall": wall, "best": c.best_accuracy, "last": c.last_accuracy, "min_ppl": c.min_ppl,
                        "last_ppl": c.last_ppl, "ratio": c.ppl_ratio, "checks": sum(c.passed.values())}
            shipped = args.pretrain_steps == DEMO_PRETRAIN.steps  # the README: the shipped base
            print(difference(measured, readme.get(seed) if shipped else None))
    print("checks: best acc >= 0.60 | last ppl >= 2x min | last acc within 5 points of best | late epochs over-memorized")


if __name__ == "__main__":
    main()
