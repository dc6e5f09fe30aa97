"""Token-level losses over response tokens: plain cross-entropy and memorization-aware
reweighting (MAR, paper eq. 2) with its focal generalisation.

    loss = sum_t w_t * CE_t / N,   w_t = (1 - p(y_t)) ** gamma,   CE_t = -log p(y_t)

MAR is gamma = 1 (focal loss at the token level); gamma = 0 is plain CE. N is the number of
response tokens in the whole accumulated batch, so the loss of a batch split into micro-batches
equals the loss of the batch at once. The weight is detached by default (the paper does not say;
focal loss and TRL's DFT detach), so the gradient is w_t * dCE_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.encoding import IGNORE


def weighted_token_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = 0.0,
    detach_weight: bool = True,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (1 - p)^gamma-weighted cross-entropy of the labelled tokens.

    logits: (B, T, V) from the model; labels: (B, T) with IGNORE on prompt and padding. Position
    t predicts token t + 1. `num_items` is the divisor (default: labelled tokens in this batch).
    """
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE
    ce = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")  # (N,)
    if gamma:
        p = torch.exp(-ce)
        weight = (1.0 - p).clamp_min(0.0) ** gamma
        ce = ce * (weight.detach() if detach_weight else weight)
    denom = keep.sum() if num_items is None else num_items
    return ce.sum() / torch.as_tensor(denom, device=ce.device).clamp_min(1)
