"""Every YAML config shipped under examples/ loads and validates (so the examples never rot)."""

from pathlib import Path

import pytest

from overmem.config import load_config

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
