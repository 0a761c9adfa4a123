"""An exponential moving average (EMA) of the weights that the run evaluates and ships in place of the
trained weights (``ema.enabled``).

Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` does the work: a
``torch.optim.swa_utils.AveragedModel`` updated after every optimiser step, swapped in for each validation
during fit (so ``monitor``, the history and ModelCheckpoint's choice of the best epoch are the average's),
written as each checkpoint's ``state_dict`` with the trained weights beside it (``current_model_state``)
and the average's step count (``averaging_state``), so that ``ckpt_path=last`` continues both, and copied
into the module when training ends. This subclass changes three things:

* After fit the module *is* the average, and the callback steps aside. Lightning's would, in
  ``validate``/``test`` with ``ckpt_path=best``, reload the trained weights from ``current_model_state``
  and test those; here validation, calibration, test, the gallery and ``best.ckpt`` (which then holds the
  average alone) all use the averaged weights of the best epoch, so evaluate/predict/explain/export use
  them without knowing.
* The average lives on the training device (Lightning's is made in ``setup``, before the model moves, so on
  the CPU: a copy to the host after every GPU step), and is made without calling ``configure_model``
  early (which would compile before the copy).
* timm's EMA warm-up (``ModelEmaV3(use_warmup=True)``, power 2/3): after ``n`` updates the decay is
  ``min(decay, 1 - (1 + n) ** -2/3)`` (0.95 after 100 steps, 0.99 after 1000), so in a run of a few
  hundred steps the average is not stuck near the initial weights (``warmup=false``: ``decay`` throughout).

Buffers: floating-point ones (BatchNorm running statistics) are averaged like the weights, as timm's EMA
does, so the averaged weights come with statistics of their own; others (BatchNorm's batch counters, the
module's class-weight switch) are copied. Frozen parameters and the statistics of BatchNorm layers kept in
eval mode (``finetune.bn``) do not change, so their average is themselves: stage 1 averages the head only.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel

WARMUP_POWER = 2 / 3  # timm ModelEmaV3's default warmup_power


class EMAWeights(WeightAveraging):
    def __init__(self, decay: float, warmup: bool) -> None:
        """``decay`` in (0, 1) (``skinlesion.settings`` checks the config's): the weight the average keeps;
        the defaults are conf/train.yaml's ``ema``."""
        super().__init__(use_buffers=True)  # the average is made in setup, on the training device
        self.decay = float(decay)
        self.warmup = bool(warmup)
        # Steps averaged in (AveragedModel's n_averaged), counted on the host: reading the device's count
        # for every step's decay would wait for the GPU each optimiser step.
        self.updates = 0

    def decay_after(self, updates: int) -> float:
        """The decay of the update that follows ``updates`` earlier ones."""
        return min(self.decay, 1 - (1 + updates) ** -WARMUP_POWER) if self.warmup else self.decay

    def _update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        """AveragedModel's ``multi_avg_fn``, for one device and dtype at a time (its first update copies);
        ``updates`` (the device's count) equals ``self.updates``, which is read instead."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - self.decay_after(self.updates))
        else:
            torch._foreach_copy_(averaged, current)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = AveragedModel(
                pl_module, device=trainer.strategy.root_device, use_buffers=True, multi_avg_fn=self._update
            )
            self.updates = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Lightning's update after each optimiser step, counted (it records the step of each update)."""
        latest = self._latest_update_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.updates += self._latest_update_step != latest

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The module holds the average now (``on_train_end``): what follows evaluates it as it is."""
        self._average_model = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """In fit (a resume): the average, its count of updates and the trained weights. Outside it the
        checkpoint's ``state_dict``, the average, is what Lightning loaded, and stays."""
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
            self.updates = int(self._average_model.n_averaged)  # once per resume

    def describe(self) -> dict[str, Any]:
        """For ``metrics.json``: the evaluated weights are the average, with the decay it ended at."""
        return {
            "evaluated": "ema",
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "final_decay": round(self.decay_after(max(self.updates - 1, 0)), 6),
        }
