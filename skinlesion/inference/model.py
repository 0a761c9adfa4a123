"""A trained checkpoint ready for new images, read as its validation images were.

`predict`, `explain` and `export` start here, so none of them repeats a model's preprocessing: images go
through :func:`load_resized` (any format to RGB uint8, at the square side the DataModule decodes to
before caching or augmenting), then the checkpoint's own eval transform (its size,
interpolation and centre-crop setting), and the model normalises them with its own mean and std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import torch

from skinlesion.clinical.thresholds import CalibrationSet
from skinlesion.data.dataset import to_chw_tensor
from skinlesion.data.images import DEFAULT_MAX_PIXELS, load_resized, load_rgb
from skinlesion.data.layouts import load_records
from skinlesion.data.metadata import AGE_RANGE, read_metadata_table, rows_for_files, table_key, warn_if_no_metadata
from skinlesion.data.specs import CacheSpec
from skinlesion.data.transforms import eval_transform
from skinlesion.errors import ConfigError, DataError
from skinlesion.inference.tta import ViewPlan, predict_proba_tta
from skinlesion.models.module import CLINICAL_KEY, SkinLesionClassifier
from skinlesion.runfolder.checkpoints import classifier_from_checkpoint, read_checkpoint

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` of a GPU that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name} but no CUDA GPU is available; use device=cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name} but this machine has {count} GPU(s): cuda:0..cuda:{count - 1}")
    return device


def required_path(value: str | None, key: str, usage: str) -> Path:
    """A path setting that has no default, with the usage line when it is missing."""
    if value in (None, "", "???"):
        raise ConfigError(f"{key} is required: {usage}")
    return Path(str(value)).expanduser()


def list_images(source: str | Path) -> list[Path]:
    """The file, or every non-hidden file under the folder (any extension: a bad file gets its own error)."""
    source = Path(source).expanduser()
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder; give an image file or a folder of images")
    files = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )
    if not files:
        raise DataError(f"{source}: the folder holds no files")
    return files


@dataclass
class InferenceModel:
    """The classifier (eval mode, on ``device``) with the data settings it was trained with."""

    model: SkinLesionClassifier
    path: Path
    data: dict = field(default_factory=dict)  # the DataModule settings saved in the checkpoint
    clinical: CalibrationSet | None = None  # the validation predictions thresholds are fitted on (older: none)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> InferenceModel:
        path = Path(path).expanduser()
        checkpoint = read_checkpoint(path)
        model = classifier_from_checkpoint(checkpoint, path).to(resolve_device(device))
        model.configure_model()  # channels_last weights on a GPU, as the inputs it will get
        clinical = checkpoint.get(CLINICAL_KEY)
        calibration = CalibrationSet.from_checkpoint(clinical) if clinical is not None else None
        return cls(model, path, dict(checkpoint.get("datamodule_hyper_parameters") or {}), calibration)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.model.class_names

    @property
    def center_crop(self) -> bool:
        return bool(self.data.get("center_crop", False))

    @property
    def max_pixels(self) -> int:
        return int(self.data.get("max_image_pixels") or DEFAULT_MAX_PIXELS)

    @cached_property
    def transform(self) -> A.Compose:
        return eval_transform(self.model.preprocessing, self.center_crop)

    def read(self, path: str | Path) -> np.ndarray:
        """The file as RGB uint8 HxWx3; raises ImageReadError for a file that is not a usable image."""
        return load_rgb(path, self.max_pixels)

    @property
    def source_size(self) -> int:
        """The side the DataModule resizes every image to first (its cache size), as it trained."""
        return CacheSpec.from_config(self.data.get("cache")).source_size(self.model.preprocessing)

    def load_input(self, path: str | Path) -> torch.Tensor:
        """uint8 CxHxW at the model's input size, decoded and resized exactly as the validation loader does
        it; raises ImageReadError for a file that is not a usable image."""
        pre = self.model.preprocessing
        square = load_resized(path, self.source_size, pre.cv2_interpolation, self.max_pixels)
        return to_chw_tensor(self.transform(image=square)["image"])

    def predict_proba(
        self,
        images: torch.Tensor,
        tta_views: ViewPlan | int = 1,
        calibrated: bool = True,
        metadata: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class probabilities of uint8 NCHW ``images`` (temperature-scaled unless ``calibrated=False``), averaged
        over the ``tta_views``; ``metadata``: their encoded metadata (:meth:`metadata_for`)."""
        device = self.model.device
        metadata = metadata.to(device) if metadata is not None else None
        probs = predict_proba_tta(self.model, images.to(device), tta_views, calibrated, metadata)
        return probs.float().cpu()

    @torch.no_grad()
    def logits(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits of uint8 NCHW ``images`` (one view): what the OOD score reads."""
        device = self.model.device
        metadata = metadata.to(device) if metadata is not None else None
        return self.model(self.model.normalize(images.to(device)), metadata).float().cpu()

    def metadata_table(self, path: str | None) -> pd.DataFrame | None:
        """The ``metadata=`` CSV of predict and explain (None: none given); refused for a model without metadata."""
        if path in (None, ""):
            return None
        if self.model.metadata_spec is None:
            raise ConfigError(
                f"metadata_csv={path} but {self.path} was trained without metadata; leave metadata_csv out for it"
            )
        return read_metadata_table(path)

    def metadata_for(self, paths: list[Path], table: pd.DataFrame | None) -> torch.Tensor | None:
        """The encoded metadata of image files from a metadata table (``read_metadata_table``; files not in it,
        or no table: every field missing); None for a model trained without metadata."""
        spec = self.model.metadata_spec
        return None if spec is None else torch.from_numpy(spec.encode(rows_for_files(table, paths)))

    def warn_if_no_metadata(self, paths: list[Path], table: pd.DataFrame | None, source: str | None = None) -> None:
        """A metadata model given no metadata for any of ``paths`` says so once (its thresholds assume some);
        with a table (``source``: its file), also the files it does not list and the values it cannot read."""
        spec = self.model.metadata_spec
        if spec is None:
            return
        rows = rows_for_files(table, paths)
        warn_if_no_metadata(spec, spec.encode(rows), f"{len(paths)} image(s)")
        if table is None:
            return
        unlisted = [path.name for path in paths if table_key(table, path) is None]
        if 0 < len(unlisted) < len(paths):
            log.warning(
                "metadata_csv=%s does not list %d of %d image(s) (first: %s); they get every field missing",
                source, len(unlisted), len(paths), ", ".join(unlisted[:3]),
            )  # fmt: skip
        if unreadable := spec.unreadable(rows):
            log.warning(
                "metadata_csv=%s: %d value(s) not understood, encoded as missing/unknown: %s (age in years %g-%g; "
                "sex %s; localization as in HAM10000_metadata.csv)",
                source, len(unreadable), ", ".join(unreadable[:5]), *AGE_RANGE, "/".join(spec.sexes),
            )  # fmt: skip

    def labels_by_image_id(self) -> dict[str, int]:
        """Image id -> label of the checkpoint's dataset where it is on disk, else empty (labels unknown)."""
        if not self.data:
            return {}
        try:
            records = load_records(
                self.data["root"], self.data.get("layout", "auto"), self.data.get("subset", "Training")
            )
        except DataError:
            return {}
        return dict(zip(records["image_id"], records["label"].astype(int), strict=True))
