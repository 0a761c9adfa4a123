"""The two-stage recipe as a callback: a new head on a frozen backbone, then the last blocks unfrozen.

Which parameters train is a function of the epoch alone, applied at the start of every training epoch,
so a run resumed from any checkpoint (before or after the unfreeze epoch) continues with the right set.
Every parameter is in the optimiser from the first step (see :mod:`skinlesion.models.optim`):
unfreezing flips ``requires_grad`` and never adds a param group, so the configured scheduler (per-step
cosine, reduce-on-plateau, constant) keeps its schedule. Freezing happens after the strategy has
wrapped the model, so DDP registers every parameter and the blocks unfrozen later are synchronised too.

BatchNorm policy (``bn``): ``frozen_eval`` (default) keeps BN layers of frozen blocks in eval mode so
their running statistics stay ImageNet's; ``all_eval`` keeps every backbone BN in eval mode, also in
unfrozen blocks; ``train`` lets all BN layers update their statistics (the Keras notebook's behaviour,
and the right choice for random initial weights, which have no statistics worth keeping).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from skinlesion.errors import ConfigError
from skinlesion.models.backbone import set_requires_grad

log = logging.getLogger(__name__)

BN_POLICIES = ("frozen_eval", "all_eval", "train")


def auto_unfreeze_epoch(max_epochs: int | None) -> int | None:
    """A third of the run for stage 1; None (head only) when the run has a single epoch."""
    if max_epochs in (None, -1):  # unbounded run: the usual five head-only epochs
        return 5
    if max_epochs < 2:
        return None
    return min(max_epochs - 1, max(1, round(max_epochs / 3)))


class TwoStageFinetuning(Callback):
    def __init__(
        self,
        unfreeze_at_epoch: int | str | None = "auto",
        num_blocks: int | str = 2,
        backbone_lr: float = 1e-5,
        bn: str = "frozen_eval",
    ) -> None:
        """``unfreeze_at_epoch=0``: full fine-tuning from the start; ``None``: head only, never unfrozen;
        ``"auto"``: a third of ``trainer.max_epochs`` (at least one epoch of each stage; head only for a
        one-epoch run), so shortening a run never makes the recipe invalid.

        ``num_blocks`` counts blocks from the end of the backbone; ``"all"`` unfreezes the whole backbone.
        ``backbone_lr`` is the base learning rate of the backbone's param groups (the scheduler scales it
        like the head's); the callback sets it on the module before the optimiser is built.
        """
        if bn not in BN_POLICIES:
            raise ConfigError(f"finetune.bn='{bn}' is not valid; choose one of {', '.join(BN_POLICIES)}")
        if unfreeze_at_epoch not in (None, "auto") and (
            not isinstance(unfreeze_at_epoch, int) or unfreeze_at_epoch < 0
        ):
            raise ConfigError(
                f"finetune.unfreeze_at_epoch={unfreeze_at_epoch} must be an epoch >= 0, 'auto' or null (head only)"
            )
        if num_blocks != "all" and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ConfigError(f"finetune.num_blocks={num_blocks} must be a number of blocks >= 1 or 'all'")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.num_blocks = num_blocks
        self.backbone_lr = float(backbone_lr)
        self.bn = bn
        self.unfrozen_at: int | None = None  # the epoch stage 2 began in this run (checkpointed)

    # ---- settings checks ---------------------------------------------------------------------------
    def _blocks_to_unfreeze(self, pl_module: L.LightningModule) -> list[list[nn.Module]]:
        """The last ``num_blocks`` blocks; all of them for ``"all"`` or full fine-tuning (epoch 0)."""
        blocks = pl_module.blocks()
        if self.num_blocks == "all" or self.unfreeze_at_epoch == 0:
            return blocks
        if self.num_blocks > len(blocks):
            raise ConfigError(
                f"finetune.num_blocks={self.num_blocks} but {pl_module.spec.name} has {len(blocks)} blocks "
                f"({', '.join(str(b) for b in pl_module.spec.blocks)}); use 1..{len(blocks)} or 'all'"
            )
        return blocks[-self.num_blocks :]

    def check(self, pl_module: L.LightningModule, max_epochs: int | None) -> None:
        """Fail on settings that cannot work; ``skinlesion.train`` calls it before any data is read."""
        if self.unfreeze_at_epoch == "auto":
            self.unfreeze_at_epoch = auto_unfreeze_epoch(max_epochs)
            log.info("finetune.unfreeze_at_epoch=auto: stage 2 from epoch %s", self.unfreeze_at_epoch)
        self._blocks_to_unfreeze(pl_module)
        if self.unfreeze_at_epoch and max_epochs not in (None, -1) and self.unfreeze_at_epoch >= max_epochs:
            raise ConfigError(
                f"finetune.unfreeze_at_epoch={self.unfreeze_at_epoch} is at or past trainer.max_epochs={max_epochs}, "
                "so stage 2 would never run; lower it, raise max_epochs, or set it to null for head-only training"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the settings before any training; hand ``backbone_lr`` to the optimiser."""
        if stage != "fit":
            return
        self.check(pl_module, trainer.max_epochs)
        if pl_module.hparams.get("backbone_lr") != self.backbone_lr:
            log.info("backbone learning rate: finetune.backbone_lr=%g", self.backbone_lr)
            pl_module.hparams.backbone_lr = self.backbone_lr  # read by configure_optimizers, saved in checkpoints

    # ---- the recipe --------------------------------------------------------------------------------
    def stage_for_epoch(self, epoch: int) -> int:
        """1 = head only, 2 = last blocks unfrozen."""
        return 2 if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch else 1

    def apply(self, pl_module: L.LightningModule, epoch: int) -> None:
        """Set ``requires_grad`` and the BatchNorm modes for ``epoch`` (the module must be in train mode)."""
        backbone = pl_module.backbone
        set_requires_grad(backbone, False)
        set_requires_grad(backbone.get_classifier(), True)
        trainable: list[nn.Module] = []
        if self.stage_for_epoch(epoch) == 2:
            trainable = [m for block in self._blocks_to_unfreeze(pl_module) for m in block]
            set_requires_grad(trainable, True)
            if self.unfrozen_at is None:
                self.unfrozen_at = epoch
                what = "all" if self.unfreeze_at_epoch == 0 else self.num_blocks
                log.info("epoch %d: stage 2, %s backbone block(s) train at lr %g", epoch, what, self.backbone_lr)
        self._apply_bn_policy(backbone, trainable)

    def _apply_bn_policy(self, backbone: nn.Module, trainable: list[nn.Module]) -> None:
        in_trainable = {id(m) for module in trainable for m in module.modules()}
        for module in backbone.modules():
            if isinstance(module, _BatchNorm):
                train = self.bn == "train" or (self.bn == "frozen_eval" and id(module) in in_trainable)
                module.train(train and backbone.training)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    # ---- checkpointed state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "unfreeze_at_epoch": self.unfreeze_at_epoch,
            "num_blocks": self.num_blocks,
            "backbone_lr": self.backbone_lr,
            "bn": self.bn,
            "unfrozen_at": self.unfrozen_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run keeps the stage-2 epoch it was started with: ``auto`` resolved again from a raised
        ``trainer.max_epochs`` would move it (``skinlesion.train`` refuses changes of the other settings)."""
        saved = state_dict.get("unfreeze_at_epoch", self.unfreeze_at_epoch)
        if saved != self.unfreeze_at_epoch:
            log.info("resumed run: stage 2 from epoch %s, as the run was started", saved)
        self.unfreeze_at_epoch = saved
        self.unfrozen_at = state_dict.get("unfrozen_at")
