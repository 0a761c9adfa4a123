"""The torch Dataset: pixels from the decoded-image cache or from the files, through Albumentations."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from skinlesion.data.cache import ImageCache
from skinlesion.data.images import DEFAULT_MAX_PIXELS, ImageReadError, load_resized
from skinlesion.errors import DataError


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class LesionDataset(Dataset):
    """Items are ``{"image": uint8 CxHxW, "label": int, "index": int}``; ``index`` is the record's row; with
    ``metadata`` (the records' encoded metadata, one row each) also ``"metadata": float32 vector``.

    Augmentation is reseeded from torch's per-worker seed on first use in each process: an Albumentations
    pipeline is seeded once when built, so forked workers would otherwise all draw the same random
    parameters, and runs would not repeat under ``seed_everything``. (OpenCV's thread count is left
    alone: ``cv2.setNumThreads`` in a forked worker deadlocks once the parent has used OpenCV's pool.)
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        indices: Sequence[int],
        transform: A.Compose,
        cache: ImageCache | None = None,
        cache_rows: Sequence[int] | None = None,
        size: int | None = None,
        interpolation: int = cv2.INTER_CUBIC,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        metadata: np.ndarray | None = None,
    ) -> None:
        if cache is not None and cache_rows is None:
            raise ValueError("cache_rows are needed with a cache")
        if cache is None and size is None:
            raise ValueError("size (the cached side length) is needed without a cache")
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.cache = cache
        self.cache_rows = None if cache_rows is None else np.asarray(cache_rows, dtype=np.int64)
        self.size, self.interpolation, self.max_pixels = size, interpolation, max_pixels
        self.metadata = metadata
        self._seed: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """The image before augmentation: the cached copy, or the file decoded and resized to ``size`` as
        the cache would, so both paths feed augmentation the same pixels."""
        if self.cache is not None:
            return self.cache[self.cache_rows[i]]  # read-only view of the memory map; transforms copy
        try:
            return load_resized(self.paths[i], self.size, self.interpolation, self.max_pixels)
        except ImageReadError as err:
            raise DataError(
                f"{self.paths[i]}: {err}; fix or remove it, or train with data.cache.enabled=true (every image "
                "is then decoded before training, and data.on_bad_image=skip can drop the bad ones)"
            ) from err

    def _seed_transform(self) -> None:
        worker = get_worker_info()
        seed = worker.seed if worker is not None else torch.initial_seed()
        if seed != self._seed:
            self._seed = seed
            self.transform.set_random_seed(seed % 2**32)

    def __getitem__(self, i: int) -> dict:
        self._seed_transform()
        image = self.transform(image=self.load(i))["image"]
        item = {"image": to_chw_tensor(image), "label": int(self.labels[i]), "index": int(self.indices[i])}
        if self.metadata is not None:
            item["metadata"] = torch.from_numpy(self.metadata[i])
        return item
