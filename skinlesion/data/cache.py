"""A decoded-image cache: every image decoded and resized once into one memory-mapped uint8 array.

Decoding a 600x450 JPEG costs more than all of training's augmentation of it, and HAM10000 decoded at
256 px is under 2 GB, so the cache turns the per-epoch cost into a memory read shared by every worker
(the page cache holds one copy). It is keyed by the file list, each file's size and mtime, the cached
side length and the interpolation: change any of them and a new cache is built, and the stale cache of
the same file list and size is deleted. A cache is written under a temporary name and renamed into
place, its metadata last, so an interrupted build never leaves a half cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from skinlesion.config import available_cpus
from skinlesion.data.images import DEFAULT_MAX_PIXELS, ImageReadError, load_resized

log = logging.getLogger(__name__)

CACHE_VERSION = 2


class ImageCache:
    """``cache[i]`` is file ``i`` of the list the cache was built for, as SxSx3 uint8 RGB.

    The memory map is opened lazily in each process and never pickled, so DataLoader workers started
    with ``spawn`` (or a DDP launcher) map the file instead of receiving a copy of the whole array.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], bad: dict[int, str], built: bool) -> None:
        self.path = path
        self.shape = shape
        self.bad = bad  # file index -> why it could not be decoded
        self.built = built  # True when this call decoded the images, False when an existing cache was reused
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, np.uint8, "r", shape=self.shape)
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def _file_list_key(paths: list[str], size: int, interpolation: int) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "size": size, "interpolation": interpolation, "files": paths})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _content_key(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:16]


def cache_key(paths: list[str], size: int, interpolation: int) -> str:
    """``<file list + settings>-<sizes + mtimes>``: the first half names the cache, the second dates it."""
    return f"{_file_list_key(paths, size, interpolation)}-{size}px-{_content_key(paths)}"


def _decode_all(
    paths: list[str], target: Path, shape: tuple, interpolation: int, max_pixels: int, threads: int
) -> dict[int, str]:
    """Decode every file into a new memory-mapped array at ``target``; the files that failed, and why."""
    images = np.memmap(target, np.uint8, "w+", shape=shape)
    bad: dict[int, str] = {}

    def fill(i: int) -> None:
        try:
            images[i] = load_resized(paths[i], shape[1], interpolation, max_pixels)
        except ImageReadError as err:
            bad[i] = str(err)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fill, range(len(paths))))
    images.flush()
    return bad


def _remove_stale(cache_dir: Path, key: str) -> None:
    """Delete caches of the same file list and size whose files have since changed."""
    prefix = key.rsplit("-", 1)[0]
    for stale in cache_dir.glob(f"{prefix}-*"):
        if not stale.name.startswith(key) and ".tmp" not in stale.name:
            stale.unlink(missing_ok=True)  # a process still mapping it keeps its pages until it exits
            log.info("removed the stale cache %s", stale.name)


def open_or_build_cache(
    paths: list[str],
    size: int,
    cache_dir: str | Path,
    interpolation: int = cv2.INTER_CUBIC,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
) -> ImageCache:
    """Reuse the cache for exactly these files and settings, or decode them all into a new one."""
    cache_dir = Path(cache_dir)
    key = cache_key(paths, size, interpolation)
    data_path, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (len(paths), size, size, 3)
    if meta_path.is_file() and data_path.is_file() and data_path.stat().st_size == int(np.prod(shape)):
        meta = json.loads(meta_path.read_text())
        bad = {int(i): reason for i, reason in meta["bad"].items()}
        log.info("reusing the decoded-image cache %s (%d images at %d px)", data_path, len(paths), size)
        return ImageCache(data_path, shape, bad, built=False)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_data = data_path.with_suffix(f".u8.tmp{os.getpid()}")
    start = time.perf_counter()
    log.info("building the decoded-image cache: %d images at %d px into %s", len(paths), size, cache_dir)
    try:
        bad = _decode_all(paths, tmp_data, shape, interpolation, max_pixels, threads or available_cpus())
        os.replace(tmp_data, data_path)
    finally:
        tmp_data.unlink(missing_ok=True)
    tmp_meta = meta_path.with_suffix(f".json.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps({"size": size, "count": len(paths), "bad": bad}))
    os.replace(tmp_meta, meta_path)  # written last: its presence marks a complete cache
    _remove_stale(cache_dir, key)
    elapsed = time.perf_counter() - start
    log.info("cache built in %.1fs (%.0f images/s)", elapsed, len(paths) / max(elapsed, 1e-9))
    return ImageCache(data_path, shape, bad, built=True)
