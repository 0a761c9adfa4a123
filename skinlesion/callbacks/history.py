"""Per-epoch history (``history.csv``), training curves, and the run's training time and throughput.

The history is rewritten after every training epoch, so a run that crashes or is stopped still leaves
its curves up to that point. ``val/*`` columns are filled only in epochs that validated
(``trainer.check_val_every_n_epoch``), never with an earlier epoch's values.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import pandas as pd
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from skinlesion.models.backbone import backbone_parameters, count_parameters
from skinlesion.models.optim import NO_DECAY, is_block_group
from skinlesion.plots import plot_training_curves

log = logging.getLogger("skinlesion.epochs")

HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"


class TrainingHistory(Callback):
    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.rows: list[dict] = []
        self.train_time_s = 0.0  # training epochs only, without the validation that runs inside them
        self.train_images = 0
        self._epoch_start = 0.0
        self._epoch_images = 0
        self._val_start = 0.0
        self._epoch_val_s = 0.0
        self._validated = False  # did validation run in this training epoch
        self._restore = True

    @property
    def images_per_s(self) -> float:
        return self.train_images / self.train_time_s if self.train_time_s else float("nan")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_images = 0
        self._epoch_val_s = 0.0
        self._validated = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch_images += len(batch["label"])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._epoch_val_s += time.perf_counter() - self._val_start
            self._validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning validates inside the training epoch, before this hook: its time is not training time.
        elapsed = time.perf_counter() - self._epoch_start - self._epoch_val_s
        self.train_time_s += elapsed
        self.train_images += self._epoch_images * trainer.world_size
        row = {
            "epoch": trainer.current_epoch,
            "epoch_time_s": round(elapsed, 3),
            "val_time_s": round(self._epoch_val_s, 3),
        }
        row["images_per_s"] = round(self._epoch_images * trainer.world_size / max(elapsed, 1e-9), 1)
        rates: dict[str, float] = {}
        for group in trainer.optimizers[0].param_groups:  # a twin without weight decay has the same rate
            rates.setdefault(group.get("name", "group").removesuffix(NO_DECAY), group["lr"])
        blocks = [name for name in rates if is_block_group(name)]  # layer-wise decay: the lowest and highest
        row |= {f"lr/{name}": lr for name, lr in rates.items() if name not in blocks[1:-1]}
        row["trainable_params"] = count_parameters(pl_module)[1]
        stage = next(
            (c.stage_for_epoch(trainer.current_epoch) for c in trainer.callbacks if hasattr(c, "stage_for_epoch")), None
        )
        if stage is not None:
            row["stage"] = stage
        backbone = backbone_parameters(pl_module.backbone)  # the share stage 2 unfroze (0 in stage 1)
        trained = sum(p.numel() for p in backbone if p.requires_grad)
        row["trainable_backbone_share"] = round(trained / sum(p.numel() for p in backbone), 4)
        # Lightning keeps the last validation's values in callback_metrics until the next one.
        splits = ("train/", "val/") if self._validated else ("train/",)
        row |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(splits)}
        self.rows.append(row)
        if trainer.is_global_zero:
            log.info(epoch_line(row, trainer.max_epochs))
            self.output_dir.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(self.rows).to_csv(self.output_dir / HISTORY_FILE, index=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            plot_training_curves(pd.DataFrame(self.rows), self.output_dir / CURVES_FILE)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "train_time_s": self.train_time_s, "train_images": self.train_images}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning restores callback states also for validate/test(ckpt_path=...): evaluating the best
        # checkpoint after fit must not rewind the record to that epoch. Only a resumed fit restores it.
        self._restore = trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict) -> None:
        restore, self._restore = self._restore, True
        if not restore:
            return
        self.rows = list(state_dict.get("rows", []))
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))
        self.train_images = int(state_dict.get("train_images", 0))


def epoch_line(row: dict, max_epochs: int | None) -> str:
    """One readable line per epoch (console and ``train.log``): what a person watching a run wants to see."""

    def value(key: str, digits: int = 4) -> str:
        number = row.get(key)
        return "-" if number is None or (isinstance(number, float) and math.isnan(number)) else f"{number:.{digits}f}"

    total = f"/{max_epochs - 1}" if max_epochs and max_epochs > 0 else ""
    lrs = " ".join(f"{k}={v:.2e}" for k, v in row.items() if k.startswith("lr/"))
    return (
        f"epoch {row['epoch']}{total} stage {row.get('stage', '-')}: train/loss {value('train/loss')} "
        f"val/loss {value('val/loss')} val/balanced_acc {value('val/balanced_acc')} | {lrs} | "
        f"{row['epoch_time_s']:.1f} s, {row['images_per_s']:.1f} images/s"
    )
