"""Finetuning: methods (`methods`), token losses (`losses`) and the Trainer set up from a run config
(`trainer`). This module loads neither torch nor transformers, so the CLI can name the failure below."""


class TrainingDiverged(RuntimeError):
    """The training loss, or a checkpoint's loss, stopped being finite."""

    def __init__(self, what: str, lr: float):
        super().__init__(f"training diverged {what}; the checkpoints and results before it are kept; "
                         f"lower train.lr (now {lr:g}) or raise train.warmup_steps, with a new --out folder")
