"""Classification losses that take the class weights at call time.

The weights live in the LightningModule as a buffer (so they are saved in checkpoints and move with
the device); a loss object holds only its own settings and is built from ``conf/loss/*.yaml``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropy(nn.Module):
    """Cross-entropy with optional class weights and label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma to focus on hard images."""

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        p_true = logits.softmax(dim=1).gather(1, target[:, None]).squeeze(1)
        loss = (1 - p_true).pow(self.gamma) * ce
        if weight is None:
            return loss.mean()
        w = weight[target]
        return (w * loss).sum() / w.sum()
