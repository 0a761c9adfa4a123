"""The LightningModule shared by all five backbones.

It takes uint8 batches and normalises them on the device with the backbone's own mean/std, weights the
loss with the DataModule's class weights (kept as a buffer, so they are in every checkpoint), logs
``split/metric`` values, and keeps each evaluation epoch's predictions (with logits) until the caller
takes them (:meth:`SkinLesionClassifier.take_predictions`), so that the run artifacts, the temperature
fit and the Grad-CAM gallery need no second pass over the data.

Two options of the ISIC leaders act here too: the Shades of Gray colour constancy (``colour_constancy``, in
``preprocessing``) runs inside :meth:`normalize`, before mean/std, so every command applies it; mixup/CutMix
(``data.augment``, read from the DataModule as the class weights are) mixes training batches on the device
(:mod:`skinlesion.models.mixing`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from skinlesion.config import to_plain
from skinlesion.data.colour_constancy import shades_of_gray
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import ConfigError, TrainingDivergedError
from skinlesion.inference.predictions import SplitPredictions, probabilities
from skinlesion.labels import CLASSES
from skinlesion.models.backbone import BackboneSpec, create_backbone, get_module, resolve_blocks
from skinlesion.models.fusion import attach_fusion_head, fused_logits, fusion_spec
from skinlesion.models.metrics import classification_metrics, probability_metrics
from skinlesion.models.mixing import BatchMixer
from skinlesion.models.optim import param_groups, rename_saved_groups

log = logging.getLogger(__name__)

CLINICAL_KEY = "clinical"  # best.ckpt's entry for the clinical calibration set


class SkinLesionClassifier(L.LightningModule):
    def __init__(
        self,
        model: Mapping,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        loss: Mapping | None = None,
        backbone_lr: float = 1e-5,
        layer_decay: float | None = None,
        image_size: int | None = None,
        channels_last: bool | str = "auto",
        compile: bool | Mapping = False,
        class_names: Sequence[str] = CLASSES,
        preprocessing: Mapping | None = None,
        metadata: Mapping | None = None,
        colour_constancy: float | None = None,
    ) -> None:
        """``metadata``: the metadata fusion option's settings (:class:`MetadataSpec`; None = image only).
        ``colour_constancy``: Shades of Gray's p (null = off) for a new model; a saved ``preprocessing`` (a
        checkpoint's) carries its own."""
        super().__init__()
        model, optimizer, scheduler, loss, compile = (to_plain(v) for v in (model, optimizer, scheduler, loss, compile))
        self.spec = BackboneSpec.from_config(model)
        self.class_names = tuple(class_names)
        self.backbone = create_backbone(self.spec, num_classes=len(self.class_names))
        self.metadata_spec = fusion_spec(metadata, compile)
        if self.metadata_spec is not None:
            attach_fusion_head(self.backbone, self.metadata_spec, len(self.class_names))
        self.preprocessing = (
            Preprocessing.from_dict(preprocessing)
            if preprocessing
            else Preprocessing.from_model(self.backbone, image_size, colour_constancy)
        )
        if self.preprocessing.image_size < self.spec.min_input_size:
            raise ConfigError(
                f"image size {self.preprocessing.image_size} is too small for {self.spec.name}: it needs at least "
                f"{self.spec.min_input_size} px; raise data.image_size"
            )
        self.save_hyperparameters(
            {
                "model": model,
                "optimizer": optimizer or {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
                "scheduler": scheduler or {},
                "loss": loss or {"_target_": "skinlesion.models.losses.CrossEntropy"},
                "backbone_lr": backbone_lr,
                "layer_decay": layer_decay,  # None: one backbone rate (and in checkpoints from before it)
                "image_size": self.preprocessing.image_size,
                "channels_last": channels_last,
                "compile": compile,
                "class_names": list(self.class_names),
                "preprocessing": self.preprocessing.to_dict(),
                "metadata": self.metadata_spec.to_dict() if self.metadata_spec is not None else None,
            },
            logger=False,  # the loggers get the whole run config instead (skinlesion.tracking)
        )
        self.criterion = instantiate(self.hparams.loss)
        self.register_buffer("mean", torch.tensor(self.preprocessing.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(self.preprocessing.std).view(1, 3, 1, 1) * 255)
        self.register_buffer("class_weights", torch.ones(len(self.class_names)))
        self.register_buffer("use_class_weights", torch.tensor(False))
        self.register_buffer("temperature", torch.ones(()))  # set by calibration after training
        self.train_metrics = classification_metrics("train", self.class_names, full=False)
        self.mixer: BatchMixer | None = None  # set from the DataModule's data.augment when fitting
        self._predictions: dict[str, SplitPredictions] = {}  # the last evaluation epoch's, per split
        self._collected: dict[str, list] = {}
        # Set after training: the validation predictions the clinical thresholds are fitted on (a plain dict,
        # skinlesion.scoring.clinical.CalibrationSet.to_checkpoint), saved into best.ckpt beside the weights.
        self.clinical_calibration: dict | None = None

    # ---- model ------------------------------------------------------------------------------------------
    @property
    def uses_channels_last(self) -> bool:
        """``channels_last="auto"``: on CUDA, where NHWC convolutions are the fast path (on a 2-core CPU the
        train step was 8-40% faster too, see BENCHMARKS.md: ``module.channels_last=true`` turns it on there)."""
        setting = self.hparams.channels_last
        if setting != "auto":
            return bool(setting)
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        return device.type == "cuda"

    def blocks(self) -> list[list[torch.nn.Module]]:
        return resolve_blocks(self.backbone, self.spec)

    def gradcam_layer(self) -> torch.nn.Module:
        return get_module(self.backbone, self.spec.gradcam_layer, f"model.gradcam_layer of {self.spec.name}")

    def configure_model(self) -> None:
        """Runs before the move to the device, hence the trainer's device in ``uses_channels_last``."""
        if self.uses_channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        options = self.hparams.compile
        if options and not self.is_compiled:  # fit, validate and test each call this hook
            # In place (nn.Module.compile): parameter names, and so checkpoints, stay those of the plain model.
            self.backbone.compile(**(options if isinstance(options, Mapping) else {}))

    @property
    def is_compiled(self) -> bool:
        return getattr(self.backbone, "_compiled_call_impl", None) is not None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW on the device -> normalised float, in the backbone's layout."""
        if images.dtype == torch.uint8:
            images = self.standardize(images.float())
        if self.uses_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def standardize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float NCHW pixels in 0..255 -> the backbone's input: colour constancy if set, then mean/std."""
        if self.preprocessing.colour_constancy:
            pixels = shades_of_gray(pixels, self.preprocessing.colour_constancy)
        return (pixels - self.mean) / self.std

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for normalised float images and, for a metadata model, their encoded metadata (None: every
        field missing); a model without metadata ignores it."""
        if self.metadata_spec is None:
            return self.backbone(images)
        if metadata is None:
            metadata = self.missing_metadata(len(images))
        return fused_logits(self.backbone, images, metadata)

    def missing_metadata(self, n: int) -> torch.Tensor:
        """``n`` rows of the all-missing metadata vector, on the model's device."""
        return self.backbone.get_classifier().missing.expand(n, -1)

    def predict_proba(
        self, images: torch.Tensor, calibrated: bool = True, metadata: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = self(self.normalize(images), metadata).float()
        return probabilities(logits, self.temperature if calibrated else 1.0)

    def set_class_weights(self, weights: torch.Tensor | None) -> None:
        self.use_class_weights.fill_(weights is not None)
        if weights is not None:
            self.class_weights.copy_(weights.to(self.class_weights))

    # ---- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "class_weights"):
            self.set_class_weights(datamodule.class_weights)
            spec = getattr(datamodule, "augment_spec", None)  # a DataModule of one's own may have none: no mixing
            self.mixer = BatchMixer.from_spec(spec, len(self.class_names)) if spec is not None else None

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch["image"] = self.normalize(batch["image"])
        return batch

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights if bool(self.use_class_weights) else None
        return self.criterion(logits, target, weight)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels, target = batch["image"], batch["label"], batch["label"]
        if self.mixer is not None:  # train metrics then score each mixed image's dominant label
            images, target = self.mixer(images, labels)
            labels = target.argmax(dim=1)
        # Mixed images keep their own metadata: timm mixes image i with image n-1-i, the metadata is not mixed.
        logits = self(images, batch.get("metadata"))
        loss = self._loss(logits, target)
        # Synced (once, at the epoch's end): every DDP rank logs and checks the same mean loss.
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(logits), sync_dist=True
        )
        # update, not forward: no per-batch values are needed, Lightning computes the epoch's at its end.
        self.train_metrics.update(logits.detach(), labels)  # top-1 metrics: argmax of the logits
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        """Stop on a NaN or infinite loss, on every rank together: one rank raising alone would leave the
        others waiting for it in the next collective."""
        loss = self.trainer.callback_metrics.get("train/loss")
        finite = loss is None or bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            value = "NaN or infinite on another process" if finite else loss.item()
            raise TrainingDivergedError(
                f"train/loss became {value} in epoch {self.current_epoch}; lower optimizer.lr or "
                "finetune.backbone_lr, or set trainer.gradient_clip_val=1.0"
            )

    def _eval_step(self, split: str, batch: dict) -> None:
        logits = self(batch["image"], batch.get("metadata")).float()
        self._collected.setdefault(split, []).append((logits.detach(), batch["label"], batch["index"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _end_eval_epoch(self, split: str) -> None:
        """Score the whole split once per image: DistributedSampler repeats images to even out DDP ranks, and a
        per-rank metric synced across ranks would count those twice."""
        chunks = self._collected.pop(split, [])
        if not chunks:
            return
        logits, labels, indices = (torch.cat(parts) for parts in zip(*chunks, strict=True))
        if self.trainer.world_size > 1:  # every rank gets the whole split's outputs and computes the same scores
            logits, labels, indices = (self.all_gather(t).flatten(0, 1) for t in (logits, labels, indices))
            indices, first = _first_occurrences(indices)
            logits, labels = logits[first], labels[first]
        loss = self._loss(logits, labels)  # over the split, not a mean of batch means
        predictions = SplitPredictions.from_logits(*(t.cpu().clone() for t in (logits, labels, indices)))
        self._predictions[split] = predictions
        scores = probability_metrics(predictions.probs, predictions.labels, split, self.class_names)
        # Every rank holds the same values; syncing them keeps Lightning from warning, and changes nothing.
        self.log_dict({f"{split}/loss": float(loss), **scores}, sync_dist=self.trainer.world_size > 1)

    def take_predictions(self, split: str) -> SplitPredictions | None:
        """The uncalibrated predictions of the last ``validate``/``test`` epoch on ``split`` (None if there was
        none), handed over once: what the caller does with them is explicit in its code."""
        return self._predictions.pop(split, None)

    def on_validation_epoch_end(self) -> None:
        self._end_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval_epoch("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self(batch["image"], batch.get("metadata")).float()
        return {"probs": probabilities(logits, self.temperature), "index": batch["index"]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """best.ckpt carries what predict's clinical columns need (a variable-size set, so not a buffer)."""
        if self.clinical_calibration is not None:
            checkpoint[CLINICAL_KEY] = self.clinical_calibration

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A run saved by an earlier version resumes: its optimiser groups get today's names."""
        for state in checkpoint.get("optimizer_states", []):
            rename_saved_groups(state)

    def configure_optimizers(self) -> Any:
        decay = self.hparams.layer_decay
        groups = param_groups(self.backbone, self.hparams.backbone_lr, decay, self.blocks() if decay else None)
        optimizer = instantiate(self.hparams.optimizer)(groups)
        settings = dict(self.hparams.scheduler or {})
        if not settings:
            return optimizer
        interval = settings.pop("interval", "epoch")
        monitor = settings.pop("monitor", None)
        runtime = {}
        if interval == "step":  # step-wise schedules are told the run's length
            total = int(self.trainer.estimated_stepping_batches)
            runtime = {"total_steps": total, "steps_per_epoch": max(1, total // max(1, self.trainer.max_epochs))}
        scheduler = instantiate(settings)(optimizer, **runtime)
        config = {"scheduler": scheduler, "interval": interval}
        if monitor:
            config["monitor"] = monitor
        return {"optimizer": optimizer, "lr_scheduler": config}


def _first_occurrences(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique indices and the position of each one's first occurrence (DistributedSampler pads)."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(len(indices), device=indices.device)
    first = torch.full((len(unique),), len(indices), device=indices.device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first
