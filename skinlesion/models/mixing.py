"""Mixup and CutMix on the device (timm's ``Mixup``), with the soft targets the losses take.

The settings live in ``data.augment`` (``mixup``, ``cutmix``: the Beta distributions' alpha, 0 = off;
``mix_prob``, ``mix_switch_prob``) beside the other training augmentations; the module reads them from the
DataModule when fitting starts, as it reads the class weights. Label smoothing is the loss's own
(``loss.label_smoothing``): timm's is set to 0 so it is not applied twice.

timm mixes each image with its mirror in the batch and refuses an odd batch; the last image of an odd
batch (the epoch's last, smaller batch) keeps its own one-hot target.
"""

from __future__ import annotations

import torch
from timm.data import Mixup

from skinlesion.data.specs import AugmentSpec


class BatchMixer:
    """Mixes a normalised float batch in place and returns soft targets whose rows sum to one."""

    def __init__(self, spec: AugmentSpec, num_classes: int) -> None:
        self.mixup = Mixup(
            mixup_alpha=spec.mixup,
            cutmix_alpha=spec.cutmix,
            prob=spec.mix_prob,
            switch_prob=spec.mix_switch_prob,
            mode="batch",
            label_smoothing=0.0,
            num_classes=num_classes,
        )
        self.num_classes = num_classes

    @classmethod
    def from_spec(cls, spec: AugmentSpec, num_classes: int) -> BatchMixer | None:
        """None when neither mixup nor cutmix is on."""
        return cls(spec, num_classes) if spec.mixup or spec.cutmix else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(images) - len(images) % 2
        targets = torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)
        if even:
            images[:even], targets[:even] = self.mixup(images[:even], labels[:even])
        return images, targets
