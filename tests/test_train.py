import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from overmem.config import load_config
from overmem.models import load_checkpoint, load_model, load_tokenizer
from overmem.results import RunDir
from overmem.train import TrainingDiverged
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


class _Killed(BaseException):
    """Stands in for SIGKILL: the code after the raise never runs."""


@pytest.mark.parametrize("cut", ["state", "weights"])
def test_resume_sets_aside_a_trainer_checkpoint_cut_off_by_a_kill(tiny_model_dir, tmp_path, monkeypatch, caplog, cut):
    """A kill while the Trainer writes `trainer_state/checkpoint-4` leaves it without `trainer_state.json`
    (written last), its weights maybe torn; the re-run deletes it, resumes from checkpoint-2 and ends with
    the weights and losses of a run that was never interrupted."""
    from transformers import Trainer

    ref = finetune(*_fresh(tiny_model_dir, tmp_path / "ref"))
    cfg, model, tok, examples, run = _fresh(tiny_model_dir, tmp_path / "run")
    save_rng_state = Trainer._save_rng_state

    def killed_at_step_4(self, output_dir):  # weights, optimizer and scheduler are written by now
        if self.state.global_step == 4:
            raise _Killed
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_at_step_4)
    with pytest.raises(_Killed):
        finetune(cfg, model, tok, examples, run)
    monkeypatch.undo()
    cut_off = run.trainer_state / "checkpoint-4"
    assert (run.trainer_state / "checkpoint-2" / "trainer_state.json").exists()
    assert cut_off.is_dir() and not (cut_off / "trainer_state.json").exists()
    if cut == "weights":
        weights = cut_off / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    with caplog.at_level("WARNING", logger="overmem.train.trainer"):
        resumed = finetune(*_fresh(tiny_model_dir, tmp_path / "run"))
    assert "checkpoint-4: incomplete Trainer checkpoint" in caplog.text
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == \
        [h["loss"] for h in ref.state.log_history if "loss" in h]
    ref_params = dict(ref.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    assert json.loads((cut_off / "trainer_state.json").read_text())["global_step"] == 4  # written afresh


def _fresh(model_dir, out):
    """Config, base model, tokenizer, examples and run folder of a full finetuning for 2 epochs of 2 steps."""
    cfg = _cfg(model_dir, out, "full")
    return cfg, load_model(cfg.model), load_tokenizer(cfg.model), toy_examples(8), RunDir(cfg.out_dir)


def test_non_finite_loss_stops_training_before_the_step(tiny_model_dir, tmp_path):
    """lr=1e10: step 1 leaves weights whose loss is NaN at step 2; training stops there, before the
    optimizer step and before epoch 1 is saved (the Trainer alone would log the loss as 0.0 and go on)."""
    cfg, model, tok, examples, run = _fresh(tiny_model_dir, tmp_path / "run")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e10})})
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 2 \(loss nan\); .*lower train.lr \(now 1e\+10\)"):
        finetune(cfg, model, tok, examples, run)
    assert not run.checkpoint("epoch-1").exists()


def test_a_killed_checkpoint_save_leaves_no_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """`checkpoints/epoch-N` appears only complete, `overmem.json` included: a resume skips the save
    of any folder that exists."""
    from pathlib import Path

    write_text = Path.write_text

    def killed_writing_meta(self, *args, **kwargs):
        if self.name == "overmem.json":
            raise _Killed
        return write_text(self, *args, **kwargs)

    cfg, model, tok, examples, run = _fresh(tiny_model_dir, tmp_path / "run")
    monkeypatch.setattr(Path, "write_text", killed_writing_meta)
    with pytest.raises(_Killed):
        finetune(cfg, model, tok, examples, run)
    assert not run.checkpoint("epoch-1").exists()


def test_a_killed_initial_adapter_save_leaves_no_folder(tmp_path):
    """PiSSA/MiLoRA reuse `checkpoints/adapter-init` once it exists, so a killed save must not leave it."""
    from types import SimpleNamespace

    from overmem.train.methods import save_initial_adapter

    class HalfSaved:
        peft_config = {"default": SimpleNamespace(init_lora_weights="pissa")}

        def save_pretrained(self, path, **kwargs):
            path.mkdir(parents=True)
            (path / "adapter_config.json").write_text("{}")
            raise _Killed

    model, folder = HalfSaved(), tmp_path / "checkpoints" / "adapter-init"
    with pytest.raises(_Killed):
        save_initial_adapter(model, folder)
    assert not folder.exists()
    assert model.peft_config["default"].init_lora_weights == "pissa"
