"""The two-stage recipe as a callback: a new head on a frozen backbone, then the last blocks unfrozen.

What stage 2 trains is the same for every backbone: the last ``share`` of the backbone's parameters
(default 0.7), as the number of whole blocks, counted from the end, whose parameter share comes closest
to it. The block lists (``conf/model/*.yaml``) are fine (bottlenecks, dense layers, inverted-residual
blocks, mixed modules), so the five default backbones land within a few points of each other; "the
last N blocks" (``num_blocks``) would unfreeze from half to nearly all of a backbone depending on how
coarse its list is. ``num_blocks=N`` still asks for exactly that, explicitly.

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
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from skinlesion.errors import ConfigError
from skinlesion.models.backbone import backbone_parameters, head_parameters, set_requires_grad

log = logging.getLogger(__name__)

BN_POLICIES = ("frozen_eval", "all_eval", "train")


def auto_unfreeze_epoch(max_epochs: int | None) -> int | None:
    """A third of the run for stage 1; None (head only) when the run has a single epoch."""
    if max_epochs in (None, -1):  # unbounded run: the usual five head-only epochs
        return 5
    if max_epochs < 2:
        return None
    return min(max_epochs - 1, max(1, round(max_epochs / 3)))


def numel_params(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def numel(modules: list[nn.Module]) -> int:
    """Parameters of some modules, each counted once."""
    params = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in params.values())


def blocks_for_share(sizes: list[int], share: float) -> int:
    """How many blocks from the end hold the parameter share closest to ``share`` (the fewer on a tie)."""
    total, cumulative, best, best_gap = sum(sizes), 0, 1, math.inf
    for count, size in enumerate(reversed(sizes), start=1):
        cumulative += size
        gap = abs(cumulative / total - share)
        if gap < best_gap - 1e-12:
            best, best_gap = count, gap
    return best


class TwoStageFinetuning(Callback):
    def __init__(
        self,
        unfreeze_at_epoch: int | str | None = "auto",
        num_blocks: int | str | None = None,
        backbone_lr: float = 1e-5,
        bn: str = "frozen_eval",
        share: float | None = 0.7,
        layer_decay: float | None = None,
    ) -> None:
        """``unfreeze_at_epoch=0``: full fine-tuning from the start; ``None``: head only, never unfrozen;
        ``"auto"``: a third of ``trainer.max_epochs`` (at least one epoch of each stage; head only for a
        one-epoch run), so shortening a run never makes the recipe invalid.

        ``share``: stage 2 trains the last blocks holding this fraction of the backbone's parameters
        (closest whole number of blocks). ``num_blocks``, when given, replaces it: that many blocks counted
        from the end; ``"all"`` unfreezes the whole backbone.
        ``backbone_lr`` is the recipe's learning rate of the backbone's param groups (the scheduler scales it
        like the head's). The module's optimiser owns it (``conf/train.yaml`` hands ``finetune.backbone_lr``
        to the module); the callback reports it and refuses a module built with another value. So with
        ``layer_decay`` (:func:`skinlesion.models.optim.param_groups`: per block, the last at ``backbone_lr``).
        """
        if bn not in BN_POLICIES:
            raise ConfigError(f"finetune.bn='{bn}' is not valid; choose one of {', '.join(BN_POLICIES)}")
        if unfreeze_at_epoch not in (None, "auto") and (
            not isinstance(unfreeze_at_epoch, int) or unfreeze_at_epoch < 0
        ):
            raise ConfigError(
                f"finetune.unfreeze_at_epoch={unfreeze_at_epoch} must be an epoch >= 0, 'auto' or null (head only)"
            )
        if num_blocks not in (None, "all") and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ConfigError(f"finetune.num_blocks={num_blocks} must be a number of blocks >= 1, 'all' or null")
        if num_blocks is None and (not isinstance(share, int | float) or not 0 < share <= 1):
            raise ConfigError(
                f"finetune.share={share} must be a fraction of the backbone's parameters in (0, 1], "
                "or give finetune.num_blocks=N (the last N blocks) or all"
            )
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.num_blocks = num_blocks
        self.share = None if num_blocks is not None else float(share)
        self.backbone_lr = float(backbone_lr)
        self.layer_decay = None if layer_decay is None else float(layer_decay)
        self.bn = bn
        self.unfrozen_at: int | None = None  # the epoch stage 2 began in this run (checkpointed)
        self.resolved = False  # resolve() ran: `auto` is an epoch and the settings fit the module

    # ---- settings checks ---------------------------------------------------------------------------
    def _blocks_to_unfreeze(self, pl_module: L.LightningModule) -> list[list[nn.Module]]:
        """The last blocks by ``share`` or ``num_blocks``; all of them for ``"all"`` or full fine-tuning (epoch 0)."""
        blocks = pl_module.blocks()
        if self.num_blocks == "all" or self.unfreeze_at_epoch == 0:
            return blocks
        if self.num_blocks is None:
            return blocks[-blocks_for_share([numel(block) for block in blocks], self.share) :]
        if self.num_blocks > len(blocks):
            raise ConfigError(
                f"finetune.num_blocks={self.num_blocks} but {pl_module.spec.name} has {len(blocks)} blocks "
                f"(model.blocks in conf/model/{pl_module.spec.name}.yaml); use 1..{len(blocks)}, 'all', or "
                "finetune.share"
            )
        return blocks[-self.num_blocks :]

    @property
    def rule(self) -> str:
        """What was asked for stage 2, in the words of the config."""
        if self.unfreeze_at_epoch is None:
            return "head only"
        if self.unfreeze_at_epoch == 0 or self.num_blocks == "all":
            return "whole backbone"
        return f"num_blocks={self.num_blocks}" if self.num_blocks is not None else f"share={self.share:g}"

    def describe(self, pl_module: L.LightningModule) -> dict[str, Any]:
        """What each stage trains, in parameters, for ``metrics.json`` and the sweep report."""
        backbone = numel_params(backbone_parameters(pl_module.backbone))
        head = numel_params(head_parameters(pl_module.backbone))
        blocks = pl_module.blocks()
        stage2 = None if self.unfreeze_at_epoch is None else self._blocks_to_unfreeze(pl_module)
        stage2_params = numel([m for block in stage2 for m in block]) if stage2 is not None else None
        return {
            "rule": self.rule,
            "unfreeze_at_epoch": self.unfreeze_at_epoch,
            "backbone_lr": self.backbone_lr,
            "layer_decay": self.layer_decay,
            "bn": self.bn,
            "backbone_params": backbone,
            "blocks": len(blocks),
            "stage1_trainable_params": head,
            "stage2_blocks": len(stage2) if stage2 is not None else None,
            "stage2_backbone_params": stage2_params,
            "stage2_backbone_share": round(stage2_params / backbone, 4) if stage2 is not None else None,
            "stage2_trainable_params": stage2_params + head if stage2 is not None else None,
        }

    def resolve(self, pl_module: L.LightningModule, max_epochs: int | None) -> None:
        """Turn ``auto`` into this run's stage-2 epoch and fail on settings that cannot work, once: ``skinlesion.train``
        calls it before any data is read, :meth:`setup` for a fit started any other way."""
        if self.unfreeze_at_epoch == "auto":
            self.unfreeze_at_epoch = auto_unfreeze_epoch(max_epochs)
            log.info("finetune.unfreeze_at_epoch=auto: stage 2 from epoch %s", self.unfreeze_at_epoch)
        self._blocks_to_unfreeze(pl_module)
        if self.unfreeze_at_epoch and max_epochs not in (None, -1) and self.unfreeze_at_epoch >= max_epochs:
            raise ConfigError(
                f"finetune.unfreeze_at_epoch={self.unfreeze_at_epoch} is at or past trainer.max_epochs={max_epochs}, "
                "so stage 2 would never run; lower it, raise max_epochs, or set it to null for head-only training"
            )
        module_lr = pl_module.hparams.get("backbone_lr")
        if module_lr is not None and not math.isclose(float(module_lr), self.backbone_lr):
            raise ConfigError(
                f"finetune.backbone_lr={self.backbone_lr:g} but the module's optimiser was built with backbone_lr="
                f"{module_lr:g}; give both the same value (conf/train.yaml passes finetune.backbone_lr to the module)"
            )
        module_decay = pl_module.hparams.get("layer_decay")
        if module_decay != self.layer_decay and not (
            module_decay is not None and self.layer_decay is not None and math.isclose(module_decay, self.layer_decay)
        ):
            raise ConfigError(
                f"finetune.layer_decay={self.layer_decay} but the module's optimiser was built with layer_decay="
                f"{module_decay}; give both the same value (conf/train.yaml passes finetune.layer_decay to the module)"
            )
        self.resolved = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.resolved:
            self.resolve(pl_module, trainer.max_epochs)

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
                blocks = self._blocks_to_unfreeze(pl_module)
                share = numel(trainable) / numel_params(backbone_parameters(backbone))
                decay = f" x {self.layer_decay:g} per earlier block" if self.layer_decay is not None else ""
                log.info(
                    "epoch %d: stage 2 (%s), the last %d of %d blocks (%.1f%% of the backbone) train at lr %g%s",
                    epoch, self.rule, len(blocks), len(pl_module.blocks()), 100 * share, self.backbone_lr, decay,
                )  # fmt: skip
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
            "share": self.share,
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
