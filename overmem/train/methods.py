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

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import LORA_TARGETS, TrainConfig

WIDE_EXTRA_TARGETS = ["o_proj", "gate_proj"]
_ALPHA = {"lora": 128.0, "wide_lora": 128.0, "pissa": 64.0, "milora": 64.0}
INIT_ADAPTER = "adapter-init"  # folder (under checkpoints/) with the initial PiSSA/MiLoRA adapter


def lora_alpha(cfg: TrainConfig) -> float:
    return cfg.lora.alpha if cfg.lora.alpha is not None else _ALPHA[cfg.method]


def lora_targets(cfg: TrainConfig) -> list[str]:
    if cfg.lora.target_modules is not None:
        return list(cfg.lora.target_modules)
    return LORA_TARGETS + WIDE_EXTRA_TARGETS if cfg.method == "wide_lora" else list(LORA_TARGETS)


def changes_base(cfg: TrainConfig) -> bool:
    """Whether the method's initialisation rewrites the base weights."""
    return cfg.method in ("pissa", "milora")


def apply_method(model: PreTrainedModel, cfg: TrainConfig) -> PreTrainedModel:
    """Wrap the model for the finetuning method (`full` trains every weight, or those that
    `cfg.trainable` names)."""
    if cfg.method == "full":
        if cfg.trainable is not None:
            freeze_except(model, cfg.trainable)
        return model
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(cfg)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(
            f"train.lora.target_modules: {missing} not found in the model; "
            f"linear layers include {sorted(n for n in present if n.endswith('proj'))}"
        )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=lora_alpha(cfg),
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        init_lora_weights="pissa" if cfg.method == "pissa" else True,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.method == "milora":
        milora_init(model)
    return model


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze every parameter whose name contains none of `patterns`. A pattern that matches no
    parameter is an error (a typo would otherwise silently train nothing or everything)."""
    params = dict(model.named_parameters())
    unmatched = [p for p in patterns if not any(p in name for name in params)]
    if unmatched:
        raise ValueError(f"train.trainable: {unmatched} match no parameter; names look like {list(params)[:3]}")
    for name, param in params.items():
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
    that PEFT's conversion subtracts it (instead of re-decomposing the residual base)."""
    cfg = model.peft_config["default"]
    original = cfg.init_lora_weights
    cfg.init_lora_weights = True
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        cfg.init_lora_weights = original


def create_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """PEFT's LoRA+ optimizer when `loraplus_lr_ratio` is set; else None (the Trainer's own)."""
    if cfg.loraplus_lr_ratio is None:
        return None
    if cfg.method == "full":
        raise ValueError("train.loraplus_lr_ratio: the LoRA+ optimizer needs an adapter method, not 'full'")
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio, weight_decay=cfg.weight_decay,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
    )
