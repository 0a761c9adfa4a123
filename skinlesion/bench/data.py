"""Training DataLoader throughput: the decoded-image cache against decoding every JPEG every epoch.

    python -m skinlesion.bench data [--images 1500] [--epochs 3] [--workers N] [--size 224]
    python -m skinlesion.bench data --augment erase=0.25 --augment hair=0.5 --paths cache   # an augmentation's cost

Both paths run the project's own training DataLoader (same split, batch size, worker count and the
full training augmentation of conf/data/ham10000.yaml at ``--size`` px) over 600x450 JPEGs from
:mod:`skinlesion.data.synthetic` (generated once into ``--data-dir``). Path (a) feeds augmentation from
the memory-mapped cache; path (b) (``data.cache.enabled=false``) decodes each file with PIL and resizes
it to the cache size every epoch. One untimed warm-up epoch starts the persistent workers and warms the
OS page cache for both, so (b) is measured at its best, reading from RAM. Besides wall-clock images/s
it reports images per CPU-second of the worker processes, which a busy shared machine distorts less.
``--augment KEY=VALUE`` adds or changes a ``data.augment`` setting on top of that default (repeatable).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import timm
import yaml
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from skinlesion.config import CONFIG_DIR
from skinlesion.data import synthetic
from skinlesion.data.datamodule import SkinLesionDataModule
from skinlesion.data.preprocessing import Preprocessing


def default_augment() -> dict:
    """The training augmentation every run uses unless overridden: conf/data/ham10000.yaml's."""
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "ham10000.yaml").augment)


PATHS = {"cache": True, "plain": False}  # path -> data.cache.enabled


def augment_settings(pairs: list[str]) -> dict:
    """The default augmentation with each ``KEY=VALUE`` of ``--augment`` set (values read as YAML)."""
    settings = default_augment()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--augment {pair}: expected KEY=VALUE, e.g. --augment erase=0.25")
        settings[key] = yaml.safe_load(value)
    return settings


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m skinlesion.bench data", description=__doc__)
    parser.add_argument("--images", type=int, default=1500, help="synthetic 600x450 JPEGs (about 71%% are train)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers, both paths")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="training image size")
    parser.add_argument("--model", default="resnet50.a1_in1k", help="timm model whose preprocessing is used")
    parser.add_argument("--data-dir", default="data/cache/bench", help="where the JPEGs and the cache go")
    parser.add_argument(
        "--augment", action="append", default=[], metavar="KEY=VALUE", help="a data.augment setting over the default"
    )
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="which paths to time")
    args, _ = parser.parse_known_args(argv)
    return args


def _worker_cpu_seconds(loader: DataLoader) -> float | None:
    """CPU seconds used so far by the loader's (persistent) worker processes; None where unknown."""
    iterator = getattr(loader, "_iterator", None)
    try:
        total = 0.0
        for worker in iterator._workers:
            fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return total
    except (AttributeError, OSError, ValueError, IndexError):
        return None


def _measure(datamodule: SkinLesionDataModule, epochs: int) -> dict:
    """Wall-clock images/s after a warm-up epoch, and images per CPU second of the workers."""
    loader = datamodule.train_dataloader()
    for _ in loader:  # warm-up: worker start, page cache
        pass
    cpu_start = _worker_cpu_seconds(loader)
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += len(batch["label"])
    elapsed = time.perf_counter() - start
    cpu_end = _worker_cpu_seconds(loader)
    cpu = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
    return {
        "images": images,
        "images_per_s": round(images / elapsed, 1),
        "images_per_worker_cpu_s": round(images / cpu, 1) if cpu else None,
    }


def run(args: argparse.Namespace) -> dict:
    """Both paths' images/s (total and per worker process) and their ratio."""
    data_dir = Path(args.data_dir)
    root = synthetic.ensure_dataset(data_dir / f"synthetic_{args.images}_600x450", n_images=args.images)
    model = timm.create_model(args.model, pretrained=False)
    pre = Preprocessing.from_model(model, args.size)
    results: dict = {
        "images": args.images,
        "image_size": pre.image_size,
        "cache_size": pre.resize_size,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "augment": augment_settings(args.augment),
    }
    for name in args.paths:
        datamodule = SkinLesionDataModule(
            str(root),
            layout="ham10000",
            augment=results["augment"],
            cache={"enabled": PATHS[name], "dir": str(data_dir / "image-cache")},
            batch_size=args.batch_size,
            num_workers=args.workers,
            preprocessing=pre,
        )
        start = time.perf_counter()
        datamodule.setup("fit")  # checks the files; builds the cache on the first run
        setup_s = time.perf_counter() - start
        measured = _measure(datamodule, args.epochs)
        measured["per_worker"] = round(measured["images_per_s"] / max(args.workers, 1), 1)
        measured["setup_s"] = round(setup_s, 1)
        results[name] = measured
        print(
            f"{name:5s}: {measured['images_per_s']:7.1f} images/s, {measured['per_worker']:.1f} per worker "
            f"({args.workers} workers, {measured['images']} images in {args.epochs} epochs); "
            f"{measured['images_per_worker_cpu_s']} images per worker CPU-second"
        )
    if len(args.paths) == len(PATHS):
        results["ratio"] = round(results["cache"]["images_per_s"] / results["plain"]["images_per_s"], 2)
        print(f"cache / plain: {results['ratio']:.2f}x")
    return results


def main(argv: list[str]) -> dict:
    return run(_parse(argv))
