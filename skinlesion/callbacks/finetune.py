"""The two-stage recipe as a callback: a new head on a frozen backbone, then the last blocks unfrozen.

Which parameters train is a function of the epoch alone, re-applied at the start of every training
epoch, so a run resumed from any checkpoint (before or after the unfreeze epoch) continues with the
right set. The optimiser holds the backbone group from the start with ``finetune.backbone_lr``
(see :mod:`skinlesion.models.optim`), so schedulers never see a new param group.

BatchNorm policy (``bn``): ``frozen_eval`` (default) keeps BN layers of frozen blocks in eval mode so
their running statistics stay ImageNet's; ``all_eval`` keeps every backbone BN in eval mode, also in
unfrozen blocks; ``train`` lets all BN layers update their statistics (the Keras notebook's behaviour).
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


class TwoStageFinetuning(Callback):
    def __init__(
        self,
        unfreeze_at_epoch: int | None = 3,
        num_blocks: int | str = 2,
        backbone_lr: float = 1e-5,
        bn: str = "frozen_eval",
    ) -> None:
        """``unfreeze_at_epoch=0``: full fine-tuning from the start; ``None``: head only, never unfrozen.

        ``num_blocks`` counts blocks from the end of the backbone; ``"all"`` unfreezes the whole backbone.
        ``backbone_lr`` is the backbone param group's learning rate, recorded here with the rest of the recipe.
        """
        if bn not in BN_POLICIES:
            raise ConfigError(f"finetune.bn='{bn}' is not valid; choose one of {', '.join(BN_POLICIES)}")
        if unfreeze_at_epoch is not None and unfreeze_at_epoch < 0:
            raise ConfigError(f"finetune.unfreeze_at_epoch={unfreeze_at_epoch} must be >= 0 or null (head only)")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.num_blocks = num_blocks
        self.backbone_lr = backbone_lr
        self.bn = bn
        self.unfrozen = False

    # ---- settings checks ---------------------------------------------------------------------------
    def _blocks_to_unfreeze(self, pl_module: L.LightningModule) -> list[list[nn.Module]]:
        """The last ``num_blocks`` blocks; all of them for ``"all"`` or full fine-tuning (epoch 0)."""
        blocks = pl_module.blocks()
        if self.num_blocks != "all":
            n = int(self.num_blocks)
            if not 1 <= n <= len(blocks):
                raise ConfigError(
                    f"finetune.num_blocks={n} but {pl_module.spec.name} has {len(blocks)} blocks "
                    f"({', '.join(str(b) for b in pl_module.spec.blocks)}); use 1..{len(blocks)} or 'all'"
                )
            if self.unfreeze_at_epoch != 0:
                return blocks[-n:]
        return blocks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._blocks_to_unfreeze(pl_module)  # fail before training on a bad num_blocks
        max_epochs = trainer.max_epochs
        if self.unfreeze_at_epoch and max_epochs not in (None, -1) and self.unfreeze_at_epoch >= max_epochs:
            raise ConfigError(
                f"finetune.unfreeze_at_epoch={self.unfreeze_at_epoch} is at or past trainer.max_epochs={max_epochs}, "
                "so stage 2 would never run; lower it, raise max_epochs, or set it to null for head-only training"
            )

    # ---- the recipe --------------------------------------------------------------------------------
    def stage_for_epoch(self, epoch: int) -> int:
        """1 = head only, 2 = last blocks unfrozen."""
        return 2 if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch else 1

    def apply(self, pl_module: L.LightningModule, epoch: int) -> None:
        backbone = pl_module.backbone
        set_requires_grad(backbone, False)
        set_requires_grad(backbone.get_classifier(), True)
        trainable: list[nn.Module] = []
        if self.stage_for_epoch(epoch) == 2:
            trainable = [m for block in self._blocks_to_unfreeze(pl_module) for m in block]
            set_requires_grad(trainable, True)
        if not self.unfrozen and trainable:
            log.info("epoch %d: stage 2, unfreezing the last %s block(s)", epoch, self.num_blocks)
        self.unfrozen = bool(trainable)
        self._apply_bn_policy(backbone, trainable)

    def _apply_bn_policy(self, backbone: nn.Module, trainable: list[nn.Module]) -> None:
        in_trainable = {id(m) for module in trainable for m in module.modules()}
        for module in backbone.modules():
            if isinstance(module, _BatchNorm):
                if self.bn == "train":
                    module.train()
                elif self.bn == "all_eval" or id(module) not in in_trainable:
                    module.eval()
                else:
                    module.train()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)

    # ---- checkpointed state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "unfreeze_at_epoch": self.unfreeze_at_epoch,
            "num_blocks": self.num_blocks,
            "bn": self.bn,
            "unfrozen": self.unfrozen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("unfreeze_at_epoch"), state_dict.get("num_blocks"))
        if saved != (self.unfreeze_at_epoch, self.num_blocks):
            log.warning(
                "resuming with finetune settings (unfreeze_at_epoch, num_blocks)=%s instead of the checkpoint's %s",
                (self.unfreeze_at_epoch, self.num_blocks),
                saved,
            )
        self.unfrozen = bool(state_dict.get("unfrozen", False))
