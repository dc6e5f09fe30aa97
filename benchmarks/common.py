"""Helpers shared by the benchmark scripts: a tiny random Llama and GSM8K-like examples."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import make_char_tokenizer, toy_examples  # noqa: F401  (re-exported)


def tiny_llama(vocab_size: int, hidden: int = 256, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def paired_median_times(
    baseline: Callable[[], object], candidate: Callable[[], object], repeats: int = 5
) -> tuple[float, float]:
    """Median wall times of two functions, run alternately so that load from other processes
    affects both alike; one warm-up call each."""
    baseline(), candidate()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, acc in ((baseline, times[0]), (candidate, times[1])):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def open_run(run: Path) -> tuple:
    """A finished run folder's config (its config.yaml), tokenizer and tracked splits."""
    from overmem.config import config_from_dict, read_yaml
    from overmem.data.splits import derive_splits
    from overmem.models import load_tokenizer

    cfg = config_from_dict(read_yaml(run / "config.yaml"), "bench config")
    return cfg, load_tokenizer(cfg.model), derive_splits(cfg.data).tracked


def run_checkpoints(ap: argparse.ArgumentParser, run: Path,
                    names: Sequence[str]) -> tuple[list[str], dict[str, Path], list[str]]:
    """A finished run folder's checkpoints in order, the base first; their folders; and `names`
    with "base" read as the base model. A name the run does not have is a usage error."""
    from overmem.results import BASE, find_checkpoints

    found = find_checkpoints(run / "checkpoints")
    order = [BASE] + [c.name for c in found]
    names = [BASE if name == "base" else name for name in names]
    unknown = [name for name in names if name not in order]
    if unknown:
        ap.error(f"no checkpoint {', '.join(unknown)} in {run / 'checkpoints'} (have: base, {', '.join(order[1:])})")
    return order, {c.name: c.path for c in found}, names


def known_splits(ap: argparse.ArgumentParser, tracked: Sequence[str], splits: Sequence[str]) -> None:
    """A split the run does not track is a usage error."""
    unknown = [s for s in splits if s not in tracked]
    if unknown:
        ap.error(f"no tracked split {', '.join(unknown)} (have: {', '.join(tracked)})")


def open_checkpoint(cfg, paths: dict[str, Path], name: str):
    """Checkpoint `name` of a run (`run_checkpoints`; the base model for `BASE`) in eval mode."""
    from overmem.models import load_checkpoint, load_model
    from overmem.results import BASE

    return (load_model(cfg.model) if name == BASE else load_checkpoint(paths[name], cfg.model)).eval()


def previous_generations(run: Path, order: Sequence[str], name: str,
                         splits: Sequence[str]) -> dict[str, dict[str, list[int]] | None]:
    """Per split, the generation ids (by example id) that the checkpoint before `name` (in `order`,
    `run_checkpoints`) wrote in the run folder: tracking's drafts for `name`; None for the base."""
    from overmem.results import RunDir, read_jsonl

    i = order.index(name)
    if i == 0:
        return dict.fromkeys(splits)
    return {split: {r["id"]: r.get("generation_ids") for r in read_jsonl(RunDir(run).samples(order[i - 1], split))}
            for split in splits}
