"""Finetuning methods (paper sec. 4.3, Table 6): full, LoRA, PiSSA, MiLoRA and wide LoRA.

- `lora`: PEFT LoRA, r=64, alpha=128, on q,k,v,up,down projections.
- `wide_lora`: the paper's "LoRA+" — LoRA with `o_proj` and `gate_proj` added to the targets.
  Not PEFT's LoRA+ *optimizer*, which is the separate option `train.loraplus_lr_ratio`.
- `pissa`: PEFT's `init_lora_weights="pissa"`: the adapter starts as the r principal singular
  components of each weight and the base keeps the residual. alpha=64.
- `milora`: not in PEFT, written here: the same construction with the r *smallest* singular
  components (Wang et al., MiLoRA). alpha=64.

PiSSA and MiLoRA change the base weights. Their checkpoints are therefore saved through PEFT's
conversion (`path_initial_model_for_weight_conversion`), which stores `B A - B0 A0` as a plain
rank-2r LoRA over the *original* base, so every checkpoint loads and merges like LoRA.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import LORA_TARGETS, ConfigError, TrainConfig

WIDE_EXTRA_TARGETS = ["o_proj", "gate_proj"]
_ALPHA = {"lora": 128.0, "wide_lora": 128.0, "pissa": 64.0, "milora": 64.0}


def lora_alpha(cfg: TrainConfig) -> float:
    return cfg.lora.alpha if cfg.lora.alpha is not None else _ALPHA[cfg.method]


def lora_targets(cfg: TrainConfig) -> list[str]:
    if cfg.lora.target_modules is not None:
        return list(cfg.lora.target_modules)
    return LORA_TARGETS + WIDE_EXTRA_TARGETS if cfg.method == "wide_lora" else list(LORA_TARGETS)


def changes_base(cfg: TrainConfig) -> bool:
    """Whether the method's initialisation rewrites the base weights."""
    return cfg.method in ("pissa", "milora")


def check_method(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Raise ConfigError where the method's settings do not fit `model` or each other: adapter targets the
    model lacks, `trainable` patterns that match no parameter, the LoRA+ optimizer without an adapter.

    `apply_method` checks this too, but a run calls it first, before it writes anything: a mistake found
    mid-run would leave a run folder that the corrected config is then refused to resume."""
    if cfg.method == "full":
        if cfg.loraplus_lr_ratio is not None:
            raise ConfigError("train.loraplus_lr_ratio: the LoRA+ optimizer needs an adapter method, not 'full'")
        if cfg.trainable is not None:
            names = [name for name, _ in model.named_parameters()]
            unmatched = [p for p in cfg.trainable if not any(p in name for name in names)]
            if unmatched:
                raise ConfigError(f"train.trainable: {unmatched} match no parameter; names look like {names[:3]}")
        return
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora_targets(cfg) if t not in present]
    if missing:
        raise ConfigError(
            f"train.lora.target_modules: {missing} not found in the model; "
            f"linear layers include {sorted(n for n in present if n.endswith('proj'))}"
        )


def apply_method(model: PreTrainedModel, cfg: TrainConfig) -> PreTrainedModel:
    """Wrap the model for the finetuning method (`full` trains every weight, or those that
    `cfg.trainable` names)."""
    check_method(model, cfg)
    if cfg.method == "full":
        if cfg.trainable is not None:
            freeze_except(model, cfg.trainable)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=lora_alpha(cfg),
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(cfg),
        init_lora_weights="pissa" if cfg.method == "pissa" else True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.method == "milora":
        milora_init(model)
    return model


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter whose name contains none of `patterns` (`check_method` has made sure
    each pattern matches one: a typo would otherwise silently train nothing or everything)."""
    for name, param in model.named_parameters():
        param.requires_grad_(any(p in name for p in patterns))


@torch.no_grad()
def milora_init(model: Any, adapter: str = "default") -> None:
    """Initialise every LoRA layer from the r minor singular components of its weight.

    With W = U S V^T (singular values descending), scaling s = alpha / r and the last r
    components U_r, S_r, V_r (as PEFT builds PiSSA from the first r):
    A = diag(sqrt(S_r / s)) V_r^T, B = U_r diag(sqrt(S_r / s)), so s B A = U_r S_r V_r^T, and the
    base keeps W - s B A: the layer computes the same function at initialisation.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        weight = transpose(base.weight.to(torch.float32), module.fan_in_fan_out)  # (out, in)
        r, scale = module.r[adapter], module.scaling[adapter]
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(S[-r:] / scale)  # (r,), the r smallest singular values
        lora_a = root[:, None] * Vh[-r:]  # (r, in)
        lora_b = U[:, -r:] * root[None, :]  # (out, r)
        module.lora_A[adapter].weight.data = lora_a.to(module.lora_A[adapter].weight.dtype)
        module.lora_B[adapter].weight.data = lora_b.to(module.lora_B[adapter].weight.dtype)
        residual = weight - scale * lora_b @ lora_a
        base.weight.data = transpose(residual, module.fan_in_fan_out).to(base.weight.dtype)


def save_initial_adapter(model: Any, folder: Path) -> None:
    """Save the initial adapter of a base-changing method, marked as a plain LoRA init so
    that PEFT's conversion subtracts it (instead of re-decomposing the residual base).

    Written to a temporary folder and renamed: a resume reuses `folder` once it exists, so a
    killed save must not leave it."""
    cfg = model.peft_config["default"]
    original = cfg.init_lora_weights
    cfg.init_lora_weights = True
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
    finally:
        cfg.init_lora_weights = original
    tmp.rename(folder)


def create_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """PEFT's LoRA+ optimizer when `loraplus_lr_ratio` is set (an adapter method: see `check_method`);
    else None (the Trainer's own)."""
    if cfg.loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio, weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )
