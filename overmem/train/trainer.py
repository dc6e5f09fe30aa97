"""Finetuning with the Hugging Face Trainer: loss on response tokens only, `full` or `lora`,
a loadable checkpoint at every epoch (and optionally every K steps), resumable."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PrinterCallback,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ..config import RunConfig, TrainConfig
from ..data.encoding import IGNORE, encode_example, pad_right
from ..data.example import Example
from ..results import CHECKPOINT_META, RunDir, epoch_name, step_name
from .losses import weighted_token_ce
from .methods import INIT_ADAPTER, apply_method, changes_base, create_optimizer, save_initial_adapter


class OvermemTrainer(Trainer):
    """Trainer whose loss is computed here for `mar` / `focal` (plain `ce` uses the model's own).

    The loss is normalised by the response tokens of the whole accumulated batch
    (`num_items_in_batch`), hence `loss_is_scaled_for_ga`.
    """

    def __init__(self, *args: Any, loss_cfg: TrainConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_cfg = loss_cfg
        if loss_cfg.loss != "ce":
            self.loss_is_scaled_for_ga = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.loss_cfg.loss == "ce":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = weighted_token_ce(
            outputs.logits, labels, gamma=self.loss_cfg.gamma,
            detach_weight=self.loss_cfg.loss_detach_weight, num_items=num_items_in_batch,
        )
        return (loss, outputs) if return_outputs else loss


class ResponseOnlyCollator:
    """Right-pads a batch; prompt and padding positions carry label -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": pad_right(ids, self.pad_id),
            "labels": pad_right([f["labels"] for f in features], IGNORE),
            "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        }


def save_model_atomic(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path, **save_kwargs: Any
) -> None:
    """Save weights (safetensors) and tokenizer to `dest` via a temporary folder + rename."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


class EpochCheckpointCallback(TrainerCallback):
    """Writes `checkpoints/epoch-N` (and `step-K` every `every_steps`) as plain model folders."""

    def __init__(
        self,
        run: RunDir,
        tokenizer: PreTrainedTokenizerBase,
        every_steps: int | None = None,
        after_save: Callable[[str, PreTrainedModel, Any], None] | None = None,
        save_kwargs: dict[str, Any] | None = None,
    ):
        self.run = run
        self.tokenizer = tokenizer
        self.every_steps = every_steps
        self.after_save = after_save
        self.save_kwargs = save_kwargs or {}

    def _save(self, name: str, model: PreTrainedModel, state: Any) -> None:
        dest = self.run.checkpoint(name)
        if not dest.exists():
            save_model_atomic(model, self.tokenizer, dest, **self.save_kwargs)
            (dest / CHECKPOINT_META).write_text(
                f'{{"epoch": {state.epoch:.4f}, "step": {state.global_step}}}\n'
            )
        if self.after_save:
            self.after_save(name, model, state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._save(epoch_name(round(state.epoch)), model, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._save(step_name(state.global_step), model, state)


def training_args(cfg: RunConfig, run: RunDir, model: PreTrainedModel) -> TrainingArguments:
    t = cfg.train
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and next(model.parameters()).dtype == torch.bfloat16
    return TrainingArguments(
        output_dir=str(run.trainer_state),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        neftune_noise_alpha=t.neftune_noise_alpha,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.epochs,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=1,
        save_strategy="epoch",
        save_total_limit=1,
        report_to=t.report_to or "none",
        disable_tqdm=cfg.quiet,
        remove_unused_columns=False,
        use_cpu=not on_gpu,
        bf16=bf16,
        dataloader_num_workers=0,
    )


def latest_trainer_checkpoint(run: RunDir) -> str | None:
    ckpts = sorted(run.trainer_state.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(ckpts[-1]) if ckpts else None


def finetune(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[Example],
    run: RunDir,
    on_checkpoint: Callable[[str, PreTrainedModel, Any], None] | None = None,
) -> Trainer:
    """Train `model` on `train_examples`, saving `checkpoints/epoch-N` after every epoch.

    `on_checkpoint(name, model, state)` runs after each save (the run evaluates there, while
    the model is in memory). Resumes from the last trainer checkpoint in the run folder.
    """
    model = apply_method(model, cfg.train)
    save_kwargs = {}
    if changes_base(cfg.train):
        # Checkpoints store B A - B0 A0 as plain LoRA over the original base (see methods.py).
        init_dir = run.checkpoint(INIT_ADAPTER)
        if not init_dir.exists():
            save_initial_adapter(model, init_dir)
        save_kwargs["path_initial_model_for_weight_conversion"] = str(init_dir)
    features = []
    for ex in train_examples:
        ids, labels = encode_example(tokenizer, ex, max_length=cfg.train.max_length, add_eos=True)
        features.append({"input_ids": ids, "labels": labels})
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    trainer = OvermemTrainer(
        loss_cfg=cfg.train,
        model=model,
        args=training_args(cfg, run, model),
        train_dataset=features,
        data_collator=ResponseOnlyCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[EpochCheckpointCallback(run, tokenizer, cfg.train.save_every_steps, on_checkpoint, save_kwargs)],
        optimizers=(create_optimizer(model, cfg.train), None),
    )
    if cfg.quiet:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    trainer.train(resume_from_checkpoint=latest_trainer_checkpoint(run))
    return trainer
