import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from overmem.config import load_config
from overmem.models import load_checkpoint, load_model, load_tokenizer
from overmem.results import RunDir
from overmem.train.trainer import finetune
from tests.conftest import toy_examples


def _cfg(model_dir, out, method):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"train.method={method}", "train.epochs=2", "train.lr=1e-2",
        "train.batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=0", "train.lora.r=4",
        "train.lora.alpha=8", f"out_dir={out}", "quiet=true",
    ])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_changes_weights_logs_loss_and_saves_epochs(tiny_model_dir, tmp_path, method):
    cfg = _cfg(tiny_model_dir, tmp_path / "run", method)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = RunDir(cfg.out_dir)
    trainer = finetune(cfg, model, tok, toy_examples(8), run)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(p.requires_grad for p in trainer.model.parameters()), "no trainable parameters"
    for name, p in trainer.model.named_parameters():
        if p.requires_grad and "lora_A" not in name:  # LoRA's A starts random; B starts at zero
            ref = before.get(name.replace("base_model.model.", "")) if method == "full" else torch.zeros_like(p)
            assert not torch.equal(p.detach(), ref), f"{name} did not change"

    for epoch in (1, 2):
        folder = run.checkpoints / f"epoch-{epoch}"
        meta = json.loads((folder / "overmem.json").read_text())
        assert meta["step"] == 2 * epoch
        loaded = load_checkpoint(folder, cfg.model)
        assert loaded is not None
    if method == "full":  # plain transformers loads it
        AutoModelForCausalLM.from_pretrained(run.checkpoints / "epoch-2")


def test_same_seed_same_numbers(tiny_model_dir, tmp_path):
    results = []
    for i in range(2):
        cfg = _cfg(tiny_model_dir, tmp_path / f"run{i}", "full")
        trainer = finetune(cfg, load_model(cfg.model), load_tokenizer(cfg.model), toy_examples(8), RunDir(cfg.out_dir))
        results.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert results[0] == results[1]
