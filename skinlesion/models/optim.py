"""Optimiser parameter groups and learning-rate schedules for the two-stage recipe.

Every parameter is in the optimiser from the first step; the finetuning callback only flips
``requires_grad``. Adding a param group mid-training is what breaks ``ReduceLROnPlateau`` and OneCycle
under Lightning's ``BaseFinetuning`` (Lightning issues #12141, #8720); a parameter without a gradient
is skipped by Adam/AdamW (no moment update, no weight decay) until it is unfrozen, and its moments then
start from zero as they would in a freshly added group.

Biases and normalisation parameters (1-D tensors) get no weight decay, as in timm's training recipes:
decaying BatchNorm scales towards zero only fights the normalisation.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from skinlesion.models.backbone import backbone_parameters, head_parameters

HEAD, BACKBONE = "head", "backbone"
NO_DECAY = "/no_decay"  # suffix of the twin group without weight decay (same learning rate)


def _split_decay(name: str, params: list[torch.nn.Parameter], **settings) -> list[dict]:
    """One group with weight decay (weights) called ``name`` and one without (biases, norms) called
    ``<name>/no_decay``: Lightning's LearningRateMonitor refuses two groups of one name."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"name": name, "params": decay, **settings}]
    if no_decay:
        groups.append({"name": f"{name}{NO_DECAY}", "params": no_decay, "weight_decay": 0.0, **settings})
    return [g for g in groups if g["params"]]


def param_groups(model: torch.nn.Module, backbone_lr: float) -> list[dict]:
    """Head groups with the optimiser's own lr, backbone groups with ``backbone_lr``."""
    return _split_decay(HEAD, head_parameters(model)) + _split_decay(
        BACKBONE, backbone_parameters(model), lr=backbone_lr
    )


class WarmupCosine(LambdaLR):
    """Linear warm-up from ``warmup_start`` x lr, then cosine decay to ``min_lr_ratio`` x lr, per step.

    Every group follows the same factor, so the backbone keeps ``finetune.backbone_lr`` x factor: the
    ratio between head and backbone learning rates is the same at every step.
    """

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


def rename_saved_groups(optimizer_state: dict) -> None:
    """A checkpoint saved before the no-decay twins had names of their own holds two groups called ``head``
    (and two ``backbone``); ``Optimizer.load_state_dict`` puts those names back, and LearningRateMonitor
    refuses duplicates. The twin without weight decay is renamed as :func:`param_groups` names it now."""
    seen: set[str] = set()
    for group in optimizer_state.get("param_groups", []):
        name = group.get("name")
        if name in seen and not str(name).endswith(NO_DECAY):
            group["name"] = f"{name}{NO_DECAY}"
        seen.add(group.get("name"))
