"""The run folder: its files, written so that a crash never leaves a half-written one.

A run folder holds ``config.yaml`` (resolved), ``metrics.json``, ``history.csv``, plots, split and
prediction CSVs and ``checkpoints/``. ``metrics.json`` has ``status`` ``completed`` or ``failed`` (with
the error), which is how the comparison report tells failed jobs from finished ones.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from skinlesion.errors import FileSystemError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.ckpt"  # best weights + fitted temperature: what evaluation and the tools load
RUNS_DIR = "runs"
HYDRA_DIR = ".hydra"  # Hydra's record of a job: its config, overrides and hydra.yaml


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy and torch scalars
        return _json_safe(value.item())
    return value


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)``, then rename ``tmp`` over ``path``: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(folder: str | Path, setting: str, fix: str = "give a folder that can be written") -> None:
    """Refuse an output folder that cannot be created or written, before any work (and without writing).

    ``os.access`` is not enough: it says yes to root for any folder, and to anyone for ``/proc``; a nameless
    temporary file in the nearest existing folder is the real test.
    """
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "/" always exists
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                return
        except OSError as err:
            problem = f"cannot create files in {existing} ({err.strerror})"
    raise FileSystemError(f"{setting}: cannot write to {folder}: {problem}; {fix}")


def write_json(path: Path, data: Mapping) -> None:
    text = json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint that stands for a finished training run."""
    return Path(run_dir) / CHECKPOINT_DIR / BEST_CHECKPOINT


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write(run_dir / CONFIG_FILE, lambda tmp: tmp.write_text(text))


def is_training_run(run: Path) -> bool:
    """A training run folder, finished or not: Hydra's record names the job (check, predict and evaluate
    folders have one too), else metrics.json its task."""
    hydra_record = run / HYDRA_DIR / "hydra.yaml"
    if hydra_record.is_file():
        return OmegaConf.select(OmegaConf.load(hydra_record), "hydra.job.name") == "train"
    metrics = run / METRICS_FILE
    if metrics.is_file():
        return read_json(metrics).get("task", "train") == "train"
    return (run / HYDRA_DIR / "overrides.yaml").is_file()


def find_runs(folder: Path) -> list[Path]:
    """Every training run folder at or below ``folder``."""
    candidates = {p.parent for p in folder.rglob(METRICS_FILE)} | {p.parent for p in folder.rglob(HYDRA_DIR)}
    return sorted(run for run in candidates if is_training_run(run))
