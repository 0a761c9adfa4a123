"""Early stopping on the monitored metric that waits for stage 2 (``early_stopping.patience``).

Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping` does the counting, checkpointing of its
state (a resumed run goes on counting) and the stop; this subclass only lets it see stage-2 validations.
Stage 1 trains a new head on a frozen backbone: its scores say nothing about whether fine-tuning has
stalled, and a plateau there must not end the run before the backbone was ever unfrozen. So patience
counts from the unfreeze epoch, and the best score it must beat is the best of stage 2 (a head-only run,
``finetune.unfreeze_at_epoch=null``, counts from the first epoch). ModelCheckpoint still keeps the best
epoch of the whole run, which is what the run tests and ships.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.trainer.states import TrainerFn

from skinlesion.callbacks.finetune import TwoStageFinetuning


class Stage2EarlyStopping(EarlyStopping):
    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float) -> None:
        """``patience``: stage-2 validations without an improvement of at least ``min_delta`` (the default is
        conf/train.yaml's ``early_stopping``)."""
        super().__init__(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta, verbose=True)
        self._restore = True

    @staticmethod
    def counts(trainer: L.Trainer) -> bool:
        """Does this epoch's validation count: stage 2, a head-only run, or a fit without the recipe."""
        finetune = next((c for c in trainer.callbacks if isinstance(c, TwoStageFinetuning)), None)
        return (
            finetune is None
            or finetune.unfreeze_at_epoch is None
            or finetune.stage_for_epoch(trainer.current_epoch) == 2
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.counts(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.counts(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning restores callback states also for validate/test(ckpt_path=best) after fit: that must not
        # rewind the record to the best epoch, where the run had not stopped yet. Only a resumed fit restores.
        self._restore = trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore, self._restore = self._restore, True
        if restore:
            super().load_state_dict(state_dict)

    def describe(self) -> dict[str, Any]:
        """For ``metrics.json``: the settings, and the epoch it stopped in (None: the run used every epoch)."""
        stopped = self.stopping_reason != EarlyStoppingReason.NOT_STOPPED
        return {
            "monitor": self.monitor,
            "patience": self.patience,
            "min_delta": abs(self.min_delta),
            "stopped_epoch": self.stopped_epoch if stopped else None,
            "reason": self.stopping_reason_message if stopped else None,
        }
