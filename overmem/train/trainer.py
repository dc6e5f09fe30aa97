"""Finetuning with the Hugging Face Trainer: loss on response tokens only, `full` or `lora`,
a loadable checkpoint at every epoch (and optionally every K steps), resumable; a non-finite
training loss stops it (`TrainingDiverged`).

Launched on several processes (`torchrun`, `accelerate launch`) the Trainer trains with its own
distributed path: DDP, or FSDP / DeepSpeed when `train.fsdp` / `train.deepspeed` say so. The
global batch stays `train.batch_size` (accumulation shrinks with the number of processes), rank 0
alone writes checkpoints (consolidated full weights under FSDP and ZeRO-3), and every rank
evaluates its share of each checkpoint (`overmem.distributed`)."""

from __future__ import annotations

import inspect
import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PrinterCallback,
    PreTrainedTokenizerBase,
    SchedulerType,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_scheduler,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import OptimizerNames

from ..config import ConfigError, ModelConfig, RunConfig, TrainConfig
from ..distributed import all_gather, main_value, on_main, world_size
from ..data.encoding import IGNORE, encode_example, pad_right
from ..data.example import Example
from ..results import CHECKPOINT_META, HF_TRAINER_STATE, INIT_ADAPTER, RunDir, epoch_name, step_name
from . import TrainingDiverged
from .losses import weighted_token_ce
from .methods import apply_method, changes_base, check_method, create_optimizer, save_initial_adapter

log = logging.getLogger(__name__)


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

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch; a non-finite loss stops training before the optimizer step, so no
        checkpoint of NaN weights is saved or evaluated (the Trainer itself would log the loss as
        0.0 and go on)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = bool(torch.isfinite(loss))
        if self.args.world_size > 1:  # every rank stops at the same step, not only the one that saw it
            finite = all(all_gather(finite))
        if not finite:
            step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
            raise TrainingDiverged(f"at step {step} (loss {loss.item()})", self.args.learning_rate)
        return loss


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
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dest: Path, *, files: Mapping[str, str] | None = None,
    **save_kwargs: Any,
) -> None:
    """Save weights (safetensors), tokenizer and `files` (name -> text) to `dest` via a temporary
    folder + rename: a killed save leaves no `dest` that a resume would take as done."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(tmp)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


class EpochCheckpointCallback(TrainerCallback):
    """Writes `checkpoints/epoch-N` (and `step-K` every `every_steps`) as plain model folders.

    Rank 0 writes; under FSDP or DeepSpeed every rank first takes part in gathering the full
    weights (`bind` the trainer), and `after_save` then gets the model reloaded from the saved
    folder, since the sharded one cannot run on one rank's share of the examples."""

    def __init__(
        self,
        run: RunDir,
        tokenizer: PreTrainedTokenizerBase,
        every_steps: int | None = None,
        after_save: Callable[[str, PreTrainedModel, Any], None] | None = None,
        save_kwargs: dict[str, Any] | None = None,
        model_cfg: ModelConfig | None = None,
    ):
        self.run = run
        self.model_cfg = model_cfg or ModelConfig()
        self.tokenizer = tokenizer
        self.every_steps = every_steps
        self.after_save = after_save
        self.save_kwargs = save_kwargs or {}
        self.trainer: Trainer | None = None

    def bind(self, trainer: Trainer) -> EpochCheckpointCallback:
        self.trainer = trainer
        return self

    def _sharded(self) -> bool:
        t = self.trainer
        return t is not None and (t.is_fsdp_enabled or t.is_deepspeed_enabled)

    def _save(self, name: str, model: PreTrainedModel, state: Any) -> None:
        dest = self.run.checkpoint(name)
        if not main_value(dest.exists):
            kwargs = dict(self.save_kwargs)
            if self._sharded():  # a collective: every rank hands in its shard, rank 0 gets the whole
                kwargs["state_dict"] = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)
                model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
            meta = f'{{"epoch": {state.epoch:.4f}, "step": {state.global_step}}}\n'
            on_main(lambda: save_model_atomic(model, self.tokenizer, dest, files={CHECKPOINT_META: meta}, **kwargs))
        if self.after_save:
            if self._sharded():
                from ..models import load_checkpoint, release_memory

                saved = load_checkpoint(dest, self.model_cfg)
                self.after_save(name, saved, state)
                del saved
                release_memory()
            else:
                self.after_save(name, model, state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._save(epoch_name(round(state.epoch)), model, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._save(step_name(state.global_step), model, state)


def with_world_size(cfg: RunConfig) -> RunConfig:
    """`cfg` with `train.world_size` set to the processes launched; the global batch must split
    evenly into their per-device micro-batches (the error names the fields to change)."""
    n, t = world_size(), cfg.train
    if t.batch_size % (t.micro_batch_size * n):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size}) "
            f"x the {n} processes launched ({t.micro_batch_size * n}); change train.batch_size, "
            "train.micro_batch_size or the number of processes")
    return cfg.model_copy(update={"train": t.model_copy(update={"world_size": n})})


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
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in the forward pass
        fsdp=t.fsdp,
        fsdp_config=t.fsdp_config,
        deepspeed=t.deepspeed,
        **_sampling(t.group_by_length),
    )


def _sampling(group_by_length: bool) -> dict[str, Any]:
    """The TrainingArguments field for length-grouped micro-batches: `train_sampling_strategy` in
    recent transformers (5.2x), `group_by_length` before."""
    if not group_by_length:
        return {}
    if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


# TrainingArguments names in the Trainer's messages -> the run config's fields.
_ARG_FIELDS = {"lr_scheduler_type": "train.scheduler", "optim": "train.optimizer", "report_to": "train.report_to"}


def check_training_settings(cfg: RunConfig, run: RunDir, model: PreTrainedModel) -> None:
    """Raise ConfigError, naming the field, for every setting the Trainer or the method would
    reject only once training starts: a run calls this before it writes anything."""
    t = cfg.train
    check_method(model, t)
    if t.scheduler not in {s.value for s in SchedulerType}:
        raise ConfigError(f"train.scheduler: unknown scheduler {t.scheduler!r}; "
                          f"choose one of {', '.join(s.value for s in SchedulerType)}")
    if t.optimizer not in {o.value for o in OptimizerNames}:
        raise ConfigError(f"train.optimizer: unknown optimizer {t.optimizer!r}; "
                          "e.g. adamw_torch, adamw_torch_fused, sgd, adafactor (see transformers' OptimizerNames)")
    _check_sharding(t)
    try:
        args = training_args(cfg, run, model)
    except ImportError as err:  # DeepSpeed asked for and not installed
        raise ConfigError(f"train.deepspeed: {str(err).splitlines()[0]} (pip install deepspeed)") from None
    except ValueError as err:
        message = str(err).splitlines()[0]
        field = next((ours for theirs, ours in _ARG_FIELDS.items() if theirs in message), "train")
        raise ConfigError(f"{field}: {message}") from None
    try:  # some schedulers need settings of their own, which a run config does not pass
        placeholder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
        get_scheduler(args.lr_scheduler_type, placeholder, num_warmup_steps=t.warmup_steps,
                      num_training_steps=t.warmup_steps + 1, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train.scheduler: {t.scheduler!r} cannot be used here ({str(err).splitlines()[0]}); "
                          "choose another, e.g. linear or cosine") from None
    if t.loraplus_lr_ratio is None:  # else the optimizer is PEFT's LoRA+, not the Trainer's
        try:
            Trainer.get_optimizer_cls_and_kwargs(args, model)
        except (ImportError, ValueError) as err:
            raise ConfigError(f"train.optimizer: {t.optimizer!r}: {str(err).splitlines()[0]}") from None
    _check_report_to(args.report_to)


def _check_sharding(t: TrainConfig) -> None:
    """FSDP / DeepSpeed settings: a readable DeepSpeed JSON; a warning where accelerate would
    silently train with DDP instead (it shards on GPUs only)."""
    if t.deepspeed is not None:
        path = Path(t.deepspeed)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed: {path}: file not found (give the path to a DeepSpeed JSON config)")
        try:
            json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"train.deepspeed: {path}: not valid JSON ({err})") from None
    if (t.fsdp or t.deepspeed) and world_size() > 1 and not torch.cuda.is_available():
        log.warning("train.fsdp / train.deepspeed: accelerate shards the model on GPUs only; on the CPU the "
                    "Trainer trains with DDP (every rank holds the whole model)")


def _check_report_to(names: list[str]) -> None:
    from transformers.integrations import get_available_reporting_integrations, get_reporting_integration_callbacks

    try:
        get_reporting_integration_callbacks(names)
    except ValueError as err:
        raise ConfigError(f"train.report_to: {err}") from None
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        raise ConfigError(f"train.report_to: {', '.join(missing)} not installed; install it or remove it from the list")


def resume_checkpoint(run: RunDir) -> str | None:
    """The newest complete Trainer checkpoint of the run (None: start from the beginning); rank 0
    looks (and deletes), every rank gets its answer.

    The Trainer writes a checkpoint's weights, optimizer, scheduler and RNG states first and its
    `trainer_state.json` last; a checkpoint without a readable one was cut off by a kill. It is
    deleted, with a log line: resuming from it fails, or restarts the schedule on its weights."""
    return main_value(lambda: _newest_complete(run))


def _newest_complete(run: RunDir) -> str | None:
    found = []
    for path in run.trainer_state.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        if _complete_trainer_checkpoint(path):
            return str(path)
        log.warning("%s: incomplete Trainer checkpoint (the run was stopped while writing it); deleted, "
                    "training resumes from the complete one before it, if any", path)
        shutil.rmtree(path)
    return None


def _complete_trainer_checkpoint(path: Path) -> bool:
    try:
        state = json.loads((path / HF_TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


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
    cfg = with_world_size(cfg)
    model = apply_method(model, cfg.train)
    save_kwargs = {}
    if changes_base(cfg.train):
        # Checkpoints store B A - B0 A0 as plain LoRA over the original base (see methods.py).
        init_dir = run.checkpoint(INIT_ADAPTER)
        on_main(lambda: init_dir.exists() or save_initial_adapter(model, init_dir))
        save_kwargs["path_initial_model_for_weight_conversion"] = str(init_dir)
    features = []
    for ex in train_examples:
        ids, labels, _ = encode_example(tokenizer, ex, max_length=cfg.train.max_length, add_eos=True)
        features.append({"input_ids": ids, "labels": labels})
    on_main(lambda: run.checkpoints.mkdir(parents=True, exist_ok=True))
    saver = EpochCheckpointCallback(run, tokenizer, cfg.train.save_every_steps, on_checkpoint, save_kwargs, cfg.model)
    trainer = OvermemTrainer(
        loss_cfg=cfg.train,
        model=model,
        args=training_args(cfg, run, model),
        train_dataset=features,
        data_collator=ResponseOnlyCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[saver],
        optimizers=(create_optimizer(model, cfg.train), None),
    )
    saver.bind(trainer)
    if cfg.quiet:
        trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    trainer.train(resume_from_checkpoint=resume_checkpoint(run))
    return trainer
