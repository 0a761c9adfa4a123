"""One LightningDataModule for HAM10000, ISIC 2018 Task 3 and the synthetic set.

Loading goes: records from the layout -> every listed file checked (a bad file stops the run here,
before any decoding, unless ``on_bad_image=skip``) -> decoded-image cache (optional) -> leak-free split
-> datasets. An external test set (``test_set``) goes through the same checks and must share no image
or lesion with the main dataset. The model's own preprocessing (:class:`Preprocessing`) decides the
input size and interpolation; normalisation happens on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, WeightedRandomSampler

from skinlesion.config import available_cpus, to_plain
from skinlesion.data import synthetic as synthetic_data
from skinlesion.data.bad_images import apply_bad_image_policy, check_policy, find_bad_images, write_csv
from skinlesion.data.cache import ImageCache, open_or_build_cache
from skinlesion.data.dataset import LesionDataset
from skinlesion.data.images import DEFAULT_MAX_PIXELS
from skinlesion.data.layouts import load_records
from skinlesion.data.metadata import MetadataSpec
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.specs import AugmentSpec, CacheSpec, SplitSpec, TestSetSpec
from skinlesion.data.splits import assign_splits, check_disjoint, check_same_split, split_from_file
from skinlesion.data.transforms import eval_transform, train_transform
from skinlesion.errors import ConfigError, DataError
from skinlesion.labels import CLASSES, NUM_CLASSES

log = logging.getLogger(__name__)

CLASS_WEIGHTINGS = ("balanced", "sqrt", "none")
SPLIT_FILE = "split.csv"
SKIPPED_FILE = "skipped_images.csv"
BAD_FILE = "bad_images.csv"
MAIN, EXTERNAL = "main", "test_set"  # values of the records' "source" column
SPLIT_COLUMNS = ["image_id", "lesion_id", "dx", "label", "split", "source"]


def class_weights_from_counts(counts: np.ndarray, mode: str) -> torch.Tensor | None:
    """Loss weights per class: ``balanced`` = n / (k * n_c) (scikit-learn's), ``sqrt`` its square root."""
    check_class_weighting(mode)
    if mode == "none":
        return None
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    if mode == "sqrt":
        weights[present] = np.sqrt(weights[present])
    return torch.tensor(weights, dtype=torch.float32)


def check_class_weighting(mode: str) -> None:
    if mode not in CLASS_WEIGHTINGS:
        raise ConfigError(f"data.class_weights='{mode}' is not valid; choose one of {', '.join(CLASS_WEIGHTINGS)}")


class SkinLesionDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        layout: str = "auto",
        subset: str = "Training",
        synthetic: Mapping | None = None,
        split: SplitSpec | Mapping | None = None,
        test_set: TestSetSpec | Mapping | None = None,
        class_weights: str = "balanced",
        balanced_sampler: bool = False,
        image_size: int | None = None,
        center_crop: bool = False,
        augment: AugmentSpec | Mapping | None = None,
        cache: CacheSpec | Mapping | bool | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        on_bad_image: str = "error",
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        preprocessing: Preprocessing | Mapping | None = None,
        output_dir: str | None = None,
        test_set_only: bool = False,
        generate_synthetic: bool = True,
        split_file: str | None = None,
        metadata: MetadataSpec | Mapping | None = None,
    ) -> None:
        """``test_set_only``: read just ``test_set`` as the test split (evaluation of a trained model on an
        external set, which must not need the training data on disk). ``generate_synthetic``: a first training
        run may generate the synthetic set; every other use (evaluate, explain, a resume) must find it.
        ``split_file``: take the split from a run's ``split.csv`` (the listed images that still exist).
        ``metadata``: the model's metadata encoding (like ``preprocessing``, the model's, not saved here); given,
        every item carries its encoded metadata (all missing where the layout has none).
        ``split``, ``test_set``, ``augment`` and ``cache`` are read by their specs (:mod:`skinlesion.data.specs`)."""
        super().__init__()
        # Everything but the run-specific arguments goes into checkpoints, so `evaluate` can rebuild the split.
        self.save_hyperparameters(
            ignore=["preprocessing", "output_dir", "test_set_only", "generate_synthetic", "split_file", "metadata"],
            logger=False,  # the loggers get the whole run config instead (skinlesion.tracking)
        )
        self.generate_synthetic = generate_synthetic
        self.split_file = Path(split_file) if split_file else None
        self.split_check: dict | None = None  # with split_file: what was listed, found and left out
        if test_set_only and not test_set:
            raise ConfigError("test_set_only needs data.test_set (the external set to read)")
        self.test_set_only = test_set_only
        for key, value in self.hparams.items():
            self.hparams[key] = to_plain(value)
        if isinstance(preprocessing, Mapping):
            preprocessing = Preprocessing.from_dict(preprocessing)
        if preprocessing is not None and image_size and int(image_size) != preprocessing.image_size:
            raise ConfigError(
                f"data.image_size={image_size} differs from the model's input size {preprocessing.image_size}; "
                "set one image size for both (the model takes data.image_size)"
            )
        self.preprocessing = preprocessing
        self.metadata = MetadataSpec.from_config(to_plain(metadata)) if metadata is not None else None
        self.output_dir = Path(output_dir) if output_dir else None
        self._check_settings()
        self.records: pd.DataFrame | None = None  # every usable record, with "split" and "source" columns
        self.skipped: pd.DataFrame | None = None  # the unusable images that on_bad_image=skip dropped
        self._caches: dict[str, ImageCache] = {}  # source -> its decoded-image cache
        self.datasets: dict[str, LesionDataset] = {}

    def _check_settings(self) -> None:
        """Invalid settings fail at construction, before any file is read. The sub-settings are saved as their
        specs write them, every default filled in, so a checkpoint rebuilds this data even if a default changes."""
        check_class_weighting(self.hparams.class_weights)
        check_policy(self.hparams.on_bad_image)
        self.split_spec = SplitSpec.from_config(self.hparams.split)
        self.augment_spec = AugmentSpec.from_config(self.hparams.augment)
        self.test_set_spec = TestSetSpec.from_config(self.hparams.test_set)
        self.cache_spec = CacheSpec.from_config(self.hparams.cache)
        self.hparams.split = self.split_spec.to_dict()
        self.hparams.augment = self.augment_spec.to_dict()
        self.hparams.test_set = self.test_set_spec.to_dict() if self.test_set_spec else None
        self.hparams.cache = self.cache_spec.to_dict()
        if self.hparams.balanced_sampler and self.hparams.class_weights != "none":
            log.warning(
                "data.balanced_sampler=true with data.class_weights=%s corrects the imbalance twice; "
                "usually one of them is wanted (set data.class_weights=none)",
                self.hparams.class_weights,
            )

    # ---- settings -------------------------------------------------------------------------------------
    @property
    def split_settings(self) -> SplitSpec:
        """The split drawn from the main dataset: ``split_spec``, with no test split beside an external set."""
        if self.test_set_spec is not None:
            return replace(self.split_spec, test=0.0)  # the external set is the test split
        return self.split_spec

    @property
    def image_cache_size(self) -> int:
        """Side of the images augmentation starts from (cached or not): :meth:`CacheSpec.source_size`."""
        return self.cache_spec.source_size(self._require_preprocessing())

    @property
    def num_workers(self) -> int:
        """Loader workers per process: under DDP the node's CPUs are shared by its ranks (null = that share)."""
        if self.hparams.num_workers is not None:
            return int(self.hparams.num_workers)
        local_processes = self.trainer.num_devices if self.trainer is not None else 1
        return min(8, available_cpus() // max(1, local_processes))

    def _require_preprocessing(self) -> Preprocessing:
        if self.preprocessing is None:
            raise ConfigError("the DataModule needs the model's preprocessing; pass preprocessing=Preprocessing(...)")
        return self.preprocessing

    # ---- loading --------------------------------------------------------------------------------------
    def _load_source(self, root: str, layout: str, subset: str, name: str) -> pd.DataFrame:
        """The usable records of one dataset folder; their images cached when the cache is enabled."""
        records = load_records(root, layout, subset)
        listing = records.attrs.get("listing", str(root))
        bad = find_bad_images(records, self.hparams.max_image_pixels)
        kept = self._apply_policy(records, bad, listing, name)  # stops here, before any decoding, on error
        cache_rows = np.full(len(kept), -1)
        if self.cache_spec.enabled:
            pre = self._require_preprocessing()
            cache = open_or_build_cache(
                kept["path"].tolist(),
                self.image_cache_size,
                self.cache_spec.dir,
                pre.cv2_interpolation,
                self.hparams.max_image_pixels,
            )
            self._caches[name] = cache
            cache_rows = np.arange(len(kept))
            if cache.bad:  # files that passed the cheap check but failed to decode
                failed = kept.iloc[sorted(cache.bad)].assign(reason=[cache.bad[i] for i in sorted(cache.bad)])
                self._apply_policy(kept, failed[bad.columns], listing, name)  # reports only these new failures
                bad = pd.concat([bad, failed[bad.columns]], ignore_index=True)
                keep = ~kept["image_id"].isin(failed["image_id"]).to_numpy()
                kept, cache_rows = kept[keep], cache_rows[keep]
        if not bad.empty:
            self.skipped = pd.concat([self.skipped, bad.assign(dataset=name)], ignore_index=True)
        return kept.assign(source=name, cache_row=cache_rows).reset_index(drop=True)

    def _apply_policy(self, records: pd.DataFrame, bad: pd.DataFrame, listing: str, name: str) -> pd.DataFrame:
        """Under ``error`` the full list of bad files is written to the run folder before the error."""
        full_list = None
        if not bad.empty and self.hparams.on_bad_image == "error" and self.output_dir is not None:
            full_list = self.output_dir / (BAD_FILE if name == MAIN else f"bad_images_{name}.csv")
            if rank_zero_only.rank == 0:
                write_csv(bad, full_list)
        return apply_bad_image_policy(records, bad, self.hparams.on_bad_image, listing, full_list)

    def read_records(self) -> pd.DataFrame:
        """Every usable record of the dataset and of the external test set (``source`` tells which)."""
        parts = []
        if not self.test_set_only:
            if self.hparams.synthetic is not None:
                self._synthetic_dataset()
            parts.append(self._load_source(self.hparams.root, self.hparams.layout, self.hparams.subset, MAIN))
        if (external := self.test_set_spec) is not None:
            parts.append(self._load_source(external.root, external.layout, external.subset, EXTERNAL))
        return pd.concat(parts, ignore_index=True)

    def _synthetic_dataset(self) -> None:
        params = dict(self.hparams.synthetic)
        try:
            if self.generate_synthetic:
                synthetic_data.ensure_dataset(self.hparams.root, **params)
            else:
                synthetic_data.require_dataset(self.hparams.root, params)
        except (FileExistsError, FileNotFoundError) as err:
            raise DataError(str(err)) from None

    def assign_split(self, records: pd.DataFrame) -> pd.Series:
        """train/val/test per record: the main records split leak-free, the external test set as test."""
        main = records["source"] == MAIN
        split = pd.Series("test", index=records.index, name="split")
        if not main.any():  # test_set_only: nothing to split, and no training data to check against
            return split
        split[main] = assign_splits(records[main], self.split_settings)
        if not main.all():
            check_disjoint(records[main], records[~main], self.test_set_spec.root)
        return split

    def _load(self) -> None:
        if self.records is not None:
            return
        records = self.read_records()
        if self.split_file is None:
            records["split"] = self.assign_split(records)
        else:
            records, self.split_check = split_from_file(records, self.split_file)
        self.records = records

    def prepare_data(self) -> None:
        """Runs once per node: generate the synthetic set, check the files and build the cache."""
        self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:  # fit, validate and test each call setup; the datasets do not depend on the stage
            return
        self._load()
        pre = self._require_preprocessing()
        transforms = {"train": train_transform(pre, self.augment_spec, self.hparams.center_crop)}
        plain = eval_transform(pre, self.hparams.center_crop)
        frames = {name: self.split_records(name) for name in ("train", "val", "test")}
        self.datasets = {
            name: self._dataset(frame, transforms.get(name, plain)) for name, frame in frames.items() if not frame.empty
        }
        self._write_run_files()

    def _dataset(self, frame: pd.DataFrame, transform: A.Compose) -> LesionDataset:
        (source,) = frame["source"].unique()  # a split never mixes the main and the external set
        cache = self._caches.get(source)
        return LesionDataset(
            frame["path"].tolist(),
            frame["label"].tolist(),
            frame.index.tolist(),
            transform,
            cache=cache,
            cache_rows=frame["cache_row"].tolist() if cache is not None else None,
            size=self.image_cache_size,
            interpolation=self._require_preprocessing().cv2_interpolation,
            max_pixels=self.hparams.max_image_pixels,
            metadata=self.metadata.encode(frame) if self.metadata is not None else None,
        )

    @rank_zero_only
    def _write_run_files(self) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        split_file = self.output_dir / SPLIT_FILE
        if split_file.is_file():  # a resumed run: its split must be the one it was started on
            check_same_split(self.records, split_file)
        write_csv(self.records[SPLIT_COLUMNS], split_file)
        if self.skipped is not None and not self.skipped.empty:
            write_csv(self.skipped, self.output_dir / SKIPPED_FILE)

    # ---- what the model and the tools need -----------------------------------------------------------
    def split_records(self, split: str) -> pd.DataFrame:
        self._load()
        return self.records[self.records["split"] == split]

    @property
    def has_test(self) -> bool:
        return not self.split_records("test").empty

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES

    def class_counts(self, split: str = "train") -> np.ndarray:
        return np.bincount(self.split_records(split)["label"], minlength=NUM_CLASSES)

    @property
    def class_weights(self) -> torch.Tensor | None:
        """Loss weights from the training split (see :func:`class_weights_from_counts`)."""
        return class_weights_from_counts(self.class_counts("train"), self.hparams.class_weights)

    # ---- loaders --------------------------------------------------------------------------------------
    def _loader(self, dataset: LesionDataset, batch_size: int, shuffle: bool, sampler=None) -> DataLoader:
        workers = self.num_workers
        pin = torch.cuda.is_available() if self.hparams.pin_memory is None else self.hparams.pin_memory
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._datasets()["train"]
        sampler = None
        if self.hparams.balanced_sampler:
            # Each class drawn equally often; the draws follow torch's seed (seed_everything), like shuffling.
            counts = np.bincount(dataset.labels, minlength=NUM_CLASSES)
            sampler = WeightedRandomSampler((1.0 / counts[dataset.labels]).tolist(), len(dataset), replacement=True)
        return self._loader(dataset, self.hparams.batch_size, shuffle=True, sampler=sampler)

    def eval_dataloader(self, split: str) -> DataLoader:
        datasets = self._datasets()
        if split not in datasets:
            raise ConfigError(f"there is no '{split}' split; available: {', '.join(datasets)}")
        return self._loader(datasets[split], self.hparams.eval_batch_size or 2 * self.hparams.batch_size, False)

    def _datasets(self) -> dict[str, LesionDataset]:
        if not self.datasets:  # tools that call the loaders without a Trainer
            self.setup()
        return self.datasets

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
