"""Tracking a run's checkpoints with and without reusing earlier work (drafts and references).

    python benchmarks/bench_tracking.py RUN [--names epoch-20 ...] [--every K] [--first N] [--work DIR]
                                           [--set KEY=VALUE ...]

RUN is a finished run folder (e.g. one `overmem demo` wrote). Its checkpoints (those named, or
every K-th, the first N; the base model as epoch 0 in any case) are scanned three times with the
run's own config (and `--set` overrides), in one process: `generation.reuse_drafts` off (plain
greedy decoding); on with the previous checkpoint's generations as the only drafts ("drafts");
on as it runs, the references verified by the scoring pass too ("reuse"). Printed:

- the wall time of each scan and their ratios, and within each the time spent scoring, verifying
  drafts and decoding (the functions timed where the evaluation calls them);
- per checkpoint (reuse): the share of generated tokens accepted from a draft (and of draft
  tokens), the generations whose draft was their reference, the number that needed decoding;
- exactness: per checkpoint, generations identical with and without reuse; for each that differs,
  the first differing position, and whether the two tokens' logits there are within rounding of
  each other (a teacher-forced float32 pass of the checkpoint over prompt + common prefix);
- whether `dynamics.jsonl` (timing and draft fields aside), `phases.json` and `selection.json` are
  the same.

Timings are wall times on whatever cores the machine has; compare the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from overmem import dynamics  # noqa: E402
from overmem.config import apply_overrides, config_from_dict, read_yaml  # noqa: E402
from overmem.data.example import format_prompt  # noqa: E402
from overmem.data.splits import derive_splits  # noqa: E402
from overmem.hf_backend import HfBackend  # noqa: E402
from overmem.models import load_checkpoint, load_model, load_tokenizer  # noqa: E402
from overmem.pipeline import scan  # noqa: E402
from overmem.results import BASE, RunDir, find_checkpoints, read_jsonl  # noqa: E402

TIE = 1e-3  # logits this close are a tie to rounding (float32 logits of ~10: ulp ~1e-6, batched GEMMs ~1e-5)
STAGES = {"score": (dynamics, "score_examples"), "verify": (HfBackend, "verify"), "decode": (HfBackend, "decode")}
IGNORED = ("seconds", "draft_tokens", "draft_accepted", "reference_drafts")


STATE: dict = {"seconds": None, "current": BASE}  # the scan being timed: seconds per checkpoint and stage


def install_timers() -> None:
    """Wrap the scoring function and the Hugging Face backend's verification and decoding so that
    their wall time adds up per checkpoint in STATE["seconds"] (and the rows decoded, in its "rows
    decoded": `HfBackend.decode(self, tokenizer, inputs, ...)`)."""
    for stage, (module, name) in STAGES.items():
        real = getattr(module, name)

        def wrapper(*args, _real=real, _stage=stage, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                mine = STATE["seconds"][STATE["current"]]
                mine[_stage] += time.perf_counter() - t0
                if _stage == "decode":
                    mine["rows decoded"] += len(args[2])

        setattr(module, name, wrapper)
    real_eval = dynamics.evaluate_checkpoint

    def evaluate_checkpoint(*args, checkpoint, **kwargs):
        STATE["current"] = checkpoint
        return real_eval(*args, checkpoint=checkpoint, **kwargs)

    import overmem.pipeline as pipeline

    pipeline.evaluate_checkpoint = evaluate_checkpoint


def chosen_checkpoints(run: Path, names: list[str], every: int, first: int | None, into: Path) -> Path:
    """A folder of links to the checkpoints of `run` named (default: every `every`-th, the first `first`)."""
    ckpts = find_checkpoints(run / "checkpoints")
    ckpts = [c for c in ckpts if c.name in names] if names else ckpts[::every][:first]
    into.mkdir(parents=True)
    for c in ckpts:
        (into / c.path.name).symlink_to(c.path.resolve(), target_is_directory=True)
    return into


MODES = ("plain", "drafts", "reuse")


def scan_once(folder: Path, raw: dict, out: Path, mode: str) -> tuple[float, dict[str, dict[str, float]]]:
    """`overmem scan` of `folder` into `out` in one of MODES; its wall time and the seconds per
    checkpoint and stage. "drafts" keeps the references out: the evaluation then asks the scoring
    pass for no greedy tokens (`dynamics.evaluate_examples` reads `drafts_are_exact` for that alone)."""
    STATE["seconds"] = defaultdict(lambda: defaultdict(float))
    cfg = config_from_dict(apply_overrides(raw, [f"out_dir={out}", "quiet=true",
                                                 f"generation.reuse_drafts={str(mode != 'plain').lower()}"]),
                           "bench config")
    real = dynamics.drafts_are_exact
    if mode == "drafts":
        dynamics.drafts_are_exact = lambda model: False
    try:
        t0 = time.perf_counter()
        scan(folder, cfg)
        return time.perf_counter() - t0, STATE["seconds"]
    finally:
        dynamics.drafts_are_exact = real


@torch.inference_mode()
def logit_gap(model, tokenizer, prompt: str, prefix: list[int], a: int, b: int, max_length: int) -> float:
    """|logit(a) - logit(b)| after prompt + prefix, in float32, one sequence alone."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_length:] + prefix
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return abs(float(logits[a] - logits[b]))


def exactness(plain: RunDir, reused: RunDir, folder: Path, raw: dict, splits) -> list[dict]:
    """Per checkpoint and split: generations identical, and for those that differ the logit gap of
    the two tokens at the first difference."""
    cfg = config_from_dict(raw, "bench config")
    tokenizer = load_tokenizer(cfg.model)
    questions = {split: {ex.id: ex.question for ex in exs} for split, exs in splits.items()}
    out = []
    paths = {c.name: c.path for c in find_checkpoints(folder)}
    for row in plain.read_dynamics():
        name, split = row["checkpoint"], row["split"]
        a = {s["id"]: s.get("generation_ids") for s in read_jsonl(plain.samples(name, split))}
        b = {s["id"]: s.get("generation_ids") for s in read_jsonl(reused.samples(name, split))}
        differ = [i for i in a if a[i] != b[i]]
        gaps = []
        if differ:
            model = load_model(cfg.model) if name == BASE else load_checkpoint(paths[name], cfg.model)
            model.eval()
            for i in differ:
                x, y = a[i], b[i]
                j = next(k for k in range(min(len(x), len(y)) + 1) if k == len(x) or k == len(y) or x[k] != y[k])
                if j < len(x) and j < len(y):
                    gaps.append(logit_gap(model, tokenizer, format_prompt(questions[split][i]), x[:j], x[j], y[j],
                                          cfg.train.max_length))
                else:
                    gaps.append(float("inf"))  # one stopped where the other went on: no token pair to compare
        out.append({"checkpoint": name, "split": split, "n": len(a), "identical": len(a) - len(differ),
                    "ties": sum(g <= TIE for g in gaps), "max_gap": max(gaps, default=0.0)})
    return out


def rows_without(run: RunDir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in run.read_dynamics()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--names", nargs="*", default=[], help="the checkpoints to scan (default: all)")
    ap.add_argument("--every", type=int, default=1, help="scan every K-th checkpoint")
    ap.add_argument("--first", type=int, default=None, help="only the first N of those")
    ap.add_argument("--work", type=Path, default=None, help="folder for the two scans (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    raw = apply_overrides(read_yaml(args.run / "config.yaml"), args.set)
    folder = chosen_checkpoints(args.run, args.names, args.every, args.first, work / "checkpoints")
    install_timers()
    results = {}
    for mode in MODES:
        out = work / mode
        shutil.rmtree(out, ignore_errors=True)
        results[mode] = scan_once(folder, raw, out, mode)
        print(f"scan, {mode:>6}: {results[mode][0]:.1f} s", flush=True)
    plain, drafted, reused = (RunDir(work / mode) for mode in MODES)
    wall = {mode: t for mode, (t, _) in results.items()}
    s_plain, s_drafts, s_reused = (results[mode][1] for mode in MODES)
    print(f"\n{len(find_checkpoints(folder)) + 1} checkpoints (base included); speed-up over plain: "
          f"drafts {wall['plain'] / wall['drafts']:.2f}x, reuse {wall['plain'] / wall['reuse']:.2f}x "
          f"(reuse over drafts {wall['drafts'] / wall['reuse']:.2f}x)")
    for mode in MODES:
        total = {k: sum(v[k] for v in results[mode][1].values()) for k in STAGES}
        print(f"  {mode:>6}: score {total['score']:.1f} s, verify {total['verify']:.1f} s, decode {total['decode']:.1f} s")

    print("\ncheckpoint  accepted/generated  accepted/draft  reference drafts  rows decoded (plain -> drafts -> reuse)"
          "  decode s -> verify + decode s (drafts) -> verify + decode s (reuse)")
    by_ckpt: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in reused.read_dynamics():
        for s in read_jsonl(reused.samples(row["checkpoint"], row["split"])):
            c = by_ckpt[row["checkpoint"]]
            c["generated"] += len(s.get("generation_ids") or [])
            c["draft"] += s.get("draft_tokens") or 0
            c["accepted"] += s.get("draft_accepted") or 0
            c["reference"] += s.get("draft_source") == "reference"
    for name, c in by_ckpt.items():
        sp, sd, sr = s_plain[name], s_drafts[name], s_reused[name]
        print(f"{name:>10}  {c['accepted'] / max(c['generated'], 1):18.3f}  {c['accepted'] / max(c['draft'], 1):14.3f}"
              f"  {c['reference']:16d}  {int(sp['rows decoded']):5d} -> {int(sd['rows decoded']):4d} -> "
              f"{int(sr['rows decoded']):4d}  {sp['decode']:6.1f} -> {sd['verify']:.1f} + {sd['decode']:.1f}"
              f" -> {sr['verify']:.1f} + {sr['decode']:.1f}")
    splits = derive_splits(config_from_dict(raw, "bench config").data).tracked
    for label, other in (("drafts", drafted), ("reuse", reused)):
        print(f"\n{label} against plain:")
        report_exactness(plain, other, folder, raw, splits)
    print(f"(scans in {work})")


def report_exactness(plain: RunDir, reused: RunDir, folder: Path, raw: dict, splits) -> None:
    """Print how far the scan `reused` gave `plain`'s generations, figures and files."""
    exact = exactness(plain, reused, folder, raw, splits)
    n = sum(e["n"] for e in exact)
    same = sum(e["identical"] for e in exact)
    ties = sum(e["ties"] for e in exact)
    print(f"exactness: {same} of {n} generations identical ({same / n:.2%}); of the {n - same} others, "
          f"{ties} are ties (logit gap <= {TIE})")
    for e in exact:
        if e["identical"] < e["n"]:
            print(f"  {e['checkpoint']} {e['split']}: {e['n'] - e['identical']} differ, largest gap {e['max_gap']:.2e}")
    acc = [(a["checkpoint"], a["split"]) for a, b in zip(plain.read_dynamics(), reused.read_dynamics())
           if a["accuracy"] != b["accuracy"]]
    print(f"accuracies identical: {not acc}" + (f" {acc}" if acc else ""))
    print(f"dynamics.jsonl identical (timing and draft fields aside): {rows_without(plain) == rows_without(reused)}")
    for name in ("phases.json", "selection.json"):
        a, b = (p.root / name for p in (plain, reused))
        if a.exists() or b.exists():
            same = a.exists() and b.exists() and json.loads(a.read_text()) == json.loads(b.read_text())
            print(f"{name} identical: {same}")


if __name__ == "__main__":
    main()
