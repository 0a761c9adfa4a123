"""Classification losses that take the class weights at call time.

The weights live in the LightningModule as a buffer (so they are saved in checkpoints and move with
the device); a loss object holds only its own settings and is built from ``conf/loss/*.yaml``.

Both losses also take soft targets (rows of class probabilities, as mixup/cutmix make them,
:mod:`skinlesion.models.mixing`). A soft target is read as a mixture of labels: the loss's numerator (each
image's weighted loss) and denominator (its class weight) are both averaged over the target's classes, so a
one-hot row gives exactly the integer label's loss, class weights and label smoothing included. (torch's
``cross_entropy`` with probability targets and ``weight`` divides by the batch size instead of the summed
weights, which would rescale the balanced loss whenever mixup is on.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _class_weights(weight: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    return torch.ones(logits.shape[1], device=logits.device) if weight is None else weight


class CrossEntropy(nn.Module):
    """Cross-entropy with optional class weights and label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if not target.is_floating_point():
            return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=self.label_smoothing)
        log_p = logits.float().log_softmax(dim=1)
        smoothed = target * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[1]
        weight = _class_weights(weight, logits)
        return -(smoothed * weight * log_p).sum() / (target * weight).sum()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma to focus on hard images."""

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        if target.is_floating_point():
            return self._soft(logits, target, weight)
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        p_true = logits.softmax(dim=1).gather(1, target[:, None]).squeeze(1)
        loss = (1 - p_true).pow(self.gamma) * ce
        if weight is None:
            return loss.mean()
        w = weight[target]
        return (w * loss).sum() / w.sum()

    def _soft(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Column c holds the loss the image would have with label c; the target mixes those columns."""
        log_p = logits.log_softmax(dim=1)
        ce = -(1 - self.label_smoothing) * log_p - self.label_smoothing * log_p.mean(dim=1, keepdim=True)
        loss = (1 - log_p.exp()).pow(self.gamma) * ce
        weighted = target * _class_weights(weight, logits)
        return (weighted * loss).sum() / weighted.sum()
