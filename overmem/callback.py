"""`OverMemorizationCallback`: over-memorization tracking inside your own training script.

Works with `transformers.Trainer` and TRL's `SFTTrainer`:

```python
from overmem.callback import OverMemorizationCallback

cb = OverMemorizationCallback(tokenizer, {"validation": valid, "test": test}, "runs/my-sft",
                              on_onset="stop")
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
cb.bind(trainer)   # optional: log through the trainer's loggers (TensorBoard, W&B, MLflow)
trainer.train()
```
At every epoch end (or every evaluation, `every="evaluate"`) it scores the tracked splits, writes
the same `dynamics.jsonl` as `overmem run`, logs `overmem/<split>/ppl` and `.../accuracy`, runs
the phase rule and, at the onset of over-memorization, warns, and optionally stops training
(`on_onset="stop"`) and records the checkpoint to keep in `keep.json` (chosen by
`overmem.selection.checkpoint_to_keep`, the rule `overmem select` recommends by).

In a distributed script (`torchrun`, `accelerate launch`) every rank evaluates its share of each
split and rank 0 alone writes and warns; metrics go through `trainer.log`, whose integrations
record on rank 0 only. The model must be whole on every rank (DDP, DeepSpeed ZeRO-1/2); under FSDP
or ZeRO-3 save checkpoints and track them with `overmem scan` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase, TrainerCallback

from .config import EvalConfig, GenerationConfig, PhaseRule, SelectionConfig
from .data.example import Example
from .distributed import is_main, main_value, on_main
from .dynamics import evaluate_checkpoint
from .phases import detect_phases, phase_split
from .results import BASE, RunDir, epoch_name, step_name, write_json
from .selection import checkpoint_to_keep

logger = logging.getLogger("overmem")


class OverMemorizationCallback(TrainerCallback):
    """Evaluate tracked splits during training and react to over-memorization.

    Args:
        tokenizer: the model's tokenizer.
        splits: name -> examples; the phase rule reads `rule.split`, by default the first split
            that is neither "train" nor the validation split (as in `overmem run`), else the last.
        out_dir: folder for `dynamics.jsonl`, `samples/` and `keep.json`.
        rule: the phase rule's settings (`overmem.config.PhaseRule`, the `phases` section of a run).
        selection: the validation split and perplexity band of the checkpoint to keep.
        every: "epoch" (each epoch end) or "evaluate" (each time the Trainer evaluates).
        on_onset: "warn" (log a warning), "stop" (also stop training) or "mark" (only record).
        include_base: evaluate the model before training as `epoch-0`.
        token_splits: splits whose samples keep per-token losses for the report's token view
            (default: the phase split).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        splits: Mapping[str, Sequence[Example]],
        out_dir: str | Path,
        *,
        eval_cfg: EvalConfig | None = None,
        gen_cfg: GenerationConfig | None = None,
        max_length: int = 1024,
        rule: PhaseRule | None = None,
        selection: SelectionConfig | None = None,
        every: Literal["epoch", "evaluate"] = "epoch",
        on_onset: Literal["warn", "stop", "mark"] = "warn",
        include_base: bool = True,
        quiet: bool = True,
        token_splits: Sequence[str] | None = None,
    ):
        if not splits:
            raise ValueError("OverMemorizationCallback: give at least one split to track")
        self.tokenizer = tokenizer
        self.splits = dict(splits)
        self.run = RunDir(out_dir)
        self.eval_cfg = eval_cfg or EvalConfig()
        self.gen_cfg = gen_cfg or GenerationConfig()
        self.max_length = max_length
        self.rule = rule or PhaseRule()
        self.selection = selection or SelectionConfig()
        self.phase_split = phase_split(list(self.splits), self.rule, self.selection.valid_split)
        self.token_splits = [self.phase_split] if token_splits is None else list(token_splits)
        self.every = every
        self.on_onset = on_onset
        self.include_base = include_base
        self.quiet = quiet
        self.onset: str | None = None
        self._trainer: Any = None

    def bind(self, trainer: Any) -> OverMemorizationCallback:
        """Log metrics through `trainer.log`, so every `report_to` integration records them."""
        self._trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.include_base and state.global_step == 0:
            self._track(model, BASE, 0.0, 0, control)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every == "epoch":
            self._track(model, epoch_name(round(state.epoch)), state.epoch, state.global_step, control)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.every == "evaluate":
            self._track(model, step_name(state.global_step), state.epoch, state.global_step, control)

    def _track(self, model: Any, name: str, epoch: float | None, step: int, control: Any) -> None:
        _check_whole(model)
        new = evaluate_checkpoint(
            model, self.tokenizer, self.splits, self.run, checkpoint=name,
            epoch=None if epoch is None else round(float(epoch), 4), step=step,
            eval_cfg=self.eval_cfg, gen_cfg=self.gen_cfg, max_length=self.max_length, quiet=self.quiet,
            token_splits=self.token_splits,
        )
        metrics = {}
        for row in new:
            metrics[f"overmem/{row['split']}/ppl"] = row["ppl"]
            if row["accuracy"] is not None:
                metrics[f"overmem/{row['split']}/accuracy"] = row["accuracy"]
        if metrics and self._trainer is not None:
            self._trainer.log(metrics)
        self._check_onset(control)

    def _check_onset(self, control: Any) -> None:
        rows = main_value(self.run.read_dynamics)
        report = detect_phases(rows, split=self.phase_split, rule=self.rule)
        if report.onset is None or self.onset is not None:
            return
        self.onset = report.onset
        keep = checkpoint_to_keep(rows, phase_split=self.phase_split, valid_split=self.selection.valid_split,
                                  ppl_band=self.selection.ppl_band).checkpoint
        on_main(lambda: write_json(self.run.keep, {"onset": self.onset, "keep": keep, "phases": report.to_dict()}))
        if self.on_onset in ("warn", "stop") and is_main():
            logger.warning("over-memorization onset at %s (split %s); checkpoint to keep: %s",
                           self.onset, self.phase_split, keep)
        if self.on_onset == "stop":
            control.should_training_stop = True


def _check_whole(model: Any) -> None:
    """Refuse a model whose weights are sharded across ranks: each rank evaluates different
    examples, which a sharded forward pass (every rank in step) cannot do."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = any(isinstance(m, FullyShardedDataParallel) or type(m).__name__.startswith("FSDP")
                  for m in model.modules()) or any(hasattr(p, "ds_id") for p in model.parameters())
    if sharded:
        raise ValueError("OverMemorizationCallback: the model is sharded across ranks (FSDP or DeepSpeed ZeRO-3); "
                         "save checkpoints and track them with `overmem scan` instead")
