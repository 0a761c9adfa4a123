"""Optimiser parameter groups and learning-rate schedules for the two-stage recipe.

Both groups (head and backbone) are in the optimiser from the first step; the finetuning callback only
flips ``requires_grad``. Adding a param group mid-training is what breaks ``ReduceLROnPlateau`` and
OneCycle under Lightning's ``BaseFinetuning`` (Lightning issues #12141, #8720); a group whose
parameters have no gradient is simply skipped by Adam/AdamW until they are unfrozen.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from skinlesion.models.backbone import backbone_parameters, head_parameters


def param_groups(model: torch.nn.Module, backbone_lr: float) -> list[dict]:
    """Head with the optimiser's own lr, backbone with ``backbone_lr``."""
    return [
        {"name": "head", "params": head_parameters(model)},
        {"name": "backbone", "params": backbone_parameters(model), "lr": backbone_lr},
    ]


class WarmupCosine(LambdaLR):
    """Linear warm-up from ``warmup_start`` x lr, then cosine decay to ``min_lr_ratio`` x lr, per step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        steps_per_epoch: int,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        warmup_start: float = 0.1,
    ) -> None:
        warmup = round(warmup_epochs * steps_per_epoch)
        total = max(total_steps, warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return warmup_start + (1 - warmup_start) * step / warmup
            progress = min(1.0, (step - warmup) / (total - warmup))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
