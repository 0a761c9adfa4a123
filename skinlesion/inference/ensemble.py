"""Which checkpoints make an ensemble, and what each member is called in tables and folders.

An ensemble is given as a list of checkpoints (or run folders), or as a multirun folder, whose
completed runs each contribute their ``checkpoints/best.ckpt`` (best weights + fitted temperature).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from skinlesion.errors import ConfigError
from skinlesion.runfolder.files import BEST_CHECKPOINT, CHECKPOINT_DIR, best_checkpoint, find_runs
from skinlesion.runfolder.summary import RunSummary

log = logging.getLogger(__name__)


ENSEMBLE = "ensemble"  # the averaged model's name in tables and folders; members never take it


def sweep_checkpoints(folder: Path) -> list[Path]:
    """``best.ckpt`` of every completed run under ``folder``; failed runs are skipped with a warning."""
    found, skipped = [], []
    for run in find_runs(folder):
        completed = RunSummary.exists(run) and RunSummary.read(run).completed
        (found if completed and best_checkpoint(run).is_file() else skipped).append(run)
    if skipped:
        log.warning(
            "ensemble: skipping %d unfinished or failed run(s): %s", len(skipped), ", ".join(r.name for r in skipped)
        )
    if not found:
        raise ConfigError(
            f"ensemble={folder}: no completed run with {CHECKPOINT_DIR}/{BEST_CHECKPOINT} in this folder; "
            "pass a training multirun folder or a list of checkpoints"
        )
    return [best_checkpoint(run) for run in found]


def ensemble_checkpoints(spec: str | Sequence[str]) -> list[Path]:
    """Checkpoint files of ``ensemble=``: checkpoints, run folders and multirun folders, alone or in a list."""
    paths = [Path(p).expanduser() for p in ([spec] if isinstance(spec, str | Path) else spec)]
    if not paths:
        raise ConfigError("ensemble=[] is empty; list at least one checkpoint")
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
        elif best_checkpoint(path).is_file():
            found.append(best_checkpoint(path))
        else:
            found.extend(sweep_checkpoints(path))
    return found


def member_names(paths: Sequence[Path]) -> list[str]:
    """The run folder's name for ``<run>/checkpoints/*.ckpt``, else the file name; made unique."""
    names = [p.parent.parent.name if p.parent.name == CHECKPOINT_DIR else p.stem for p in paths]
    if len(set(names)) < len(names) or ENSEMBLE in names:
        names = [f"{i}_{name}" for i, name in enumerate(names)]
    return names
