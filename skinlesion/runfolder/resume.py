"""Resuming a run from its folder alone: the run's own configuration, and nothing that would change its result.

``python -m skinlesion.train ckpt_path=<run>/checkpoints/last.ckpt`` replays the overrides the run was
started with (``<run>/.hydra/overrides.yaml``, then those of earlier resumes), pins ``paths.root_dir`` to
the run's, and adds the new command line last. Before any file is written the resolved config is compared
with ``<run>/config.yaml``: a setting that changes what is trained (model, data, split, image size,
preprocessing, optimiser, scheduler, loss, recipe) is refused with the list of differences; settings that
cannot change the result so far (more epochs, workers, loggers, progress bar, where files go) are accepted
and recorded in ``<run>/resumes.json``. ``config.yaml`` keeps the values the run was started with.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from skinlesion.errors import ConfigError
from skinlesion.runfolder.files import CHECKPOINT_DIR, CONFIG_FILE, HYDRA_DIR, RUNS_DIR, read_json, write_json

RESUMES_FILE = "resumes.json"
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"
# Settings a resumed run may change: they decide how a run is watched, where files go or how fast it reads.
ACCEPTED_PREFIXES = (
    "ckpt_path",
    "paths.",
    "logger.",
    "gallery.",
    "print_config",
    "tracking.",
    "callbacks.lr_monitor",
    "clinical.",  # what is fitted on validation after training (and a run from before it had none)
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.default_root_dir",
    "data.num_workers",
    "data.pin_memory",
    "data.eval_batch_size",
)
ACCEPTED_SUFFIXES = (".dirpath", ".output_dir", ".save_dir")  # callbacks' and loggers' folders
ABSENT = "<absent>"  # config_changes' value for a key one side lacks
# Options added after runs were saved: a config.yaml from before one lacks its keys, and the run resumes
# as it trained with the option off (its switch at this value), whatever the option's other keys say.
# An added setting that is off at null needs no entry here: accepted_on_resume takes it.
ADDED_OPTIONS = {  # key prefix: (switch, the value that keeps the option off)
    "ema.": ("ema.enabled", False),  # ema.decay and ema.warmup have values even when it is off
    "early_stopping.": ("early_stopping.patience", None),  # so has early_stopping.min_delta
    # metadata=fusion sets 0.1; a fusion run from before it resumes with module.metadata.drop_all=0
    "module.metadata.drop_all": ("module.metadata.drop_all", 0),
}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def config_changes(saved: Mapping, current: Mapping) -> dict[str, tuple[Any, Any]]:
    """Every setting whose value differs (``<absent>`` where one side lacks it), by dotted key."""
    old, new = _flatten(saved), _flatten(current)
    return {
        key: (old.get(key, ABSENT), new.get(key, ABSENT))
        for key in sorted(set(old) | set(new))
        if old.get(key, ABSENT) != new.get(key, ABSENT)
    }


def added_and_off(key: str, old: Any, current: Mapping) -> bool:
    """A key of an option the run predates (absent from its config.yaml), with that option off in ``current``."""
    option = next((switch for prefix, switch in ADDED_OPTIONS.items() if key.startswith(prefix)), None)
    if old != ABSENT or option is None:
        return False
    switch, off = option
    return _flatten(current).get(switch, ABSENT) in (off, ABSENT)


def accepted_on_resume(key: str, old: Any, new: Any) -> bool:
    if old == ABSENT and new is None:  # a setting added since the run started, left off (null)
        return True
    if key == "trainer.max_epochs":  # more epochs continue the run; fewer would rewrite what it did
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return key.startswith(ACCEPTED_PREFIXES) or key.endswith(ACCEPTED_SUFFIXES)


def check_resume(cfg: DictConfig, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """The accepted changes against the run's ``config.yaml``; a ConfigError listing any other change."""
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
    current = OmegaConf.to_container(cfg, resolve=True)
    changes = config_changes(saved, current)
    refused = {
        key: (old, new)
        for key, (old, new) in changes.items()
        if not accepted_on_resume(key, old, new) and not added_and_off(key, old, current)
    }
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
        raise ConfigError(
            f"resuming {run_dir} with settings that change what it trains ({listed}); resume with the run's own "
            "settings (ckpt_path=... alone), or start a new run without ckpt_path"
        )
    return changes


def replayed_overrides(run_dir: Path) -> list[str]:
    """The run's own overrides (start, then earlier resumes) and its project root, to put before a resume's."""
    original = run_dir / HYDRA_OVERRIDES
    overrides = [str(o) for o in OmegaConf.load(original)] if original.is_file() else []
    resumes = run_dir / RESUMES_FILE
    for entry in read_json(resumes) if resumes.is_file() else []:
        overrides += entry.get("overrides", [])
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("ckpt_path=", "hydra.", "paths.root_dir="))]
    root = OmegaConf.load(run_dir / CONFIG_FILE).get("paths", {}).get("root_dir")
    return [*overrides, *([f"paths.root_dir={root}"] if root else [])]


def record_resume(run_dir: Path, checkpoint: str, changes: Mapping, overrides: Sequence[str]) -> None:
    """Append this resume (its checkpoint, new overrides and accepted changes) to ``resumes.json``."""
    path = run_dir / RESUMES_FILE
    entries = read_json(path) if path.is_file() else []
    entries.append(
        {
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "checkpoint": checkpoint,
            "overrides": list(overrides),
            "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items() if key != "ckpt_path"},
        }
    )
    write_json(path, entries)


def _run_of_checkpoint(value: str, outputs: Path, cwd: Path) -> Path | None:
    if value == "last":
        if (cwd / CHECKPOINT_DIR / "last.ckpt").is_file() and (cwd / CONFIG_FILE).is_file():
            return cwd.resolve()  # started inside a run folder
        found = sorted(outputs.glob(f"*/{RUNS_DIR}/*/{CHECKPOINT_DIR}/last.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1].parent.parent.resolve() if found else None
    path = Path(value).expanduser()
    if path.parent.name == CHECKPOINT_DIR and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent.resolve()
    return None


def resume_arguments(argv: Sequence[str], outputs: Path, cwd: Path) -> list[str]:
    """The command line that resumes the run ``ckpt_path=`` names in its own folder with its own settings.

    ``ckpt_path=PATH`` inside ``<run>/checkpoints/`` resumes ``<run>``; ``ckpt_path=last`` resumes the run
    folder it is started in, else the run under ``outputs/<task>/runs`` whose ``last.ckpt`` is newest. An
    explicit ``hydra.run.dir`` or a multirun is left as it is.
    """
    argv = list(argv)
    args = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith(("+", "~", "-")))
    if "ckpt_path" not in args or "hydra.run.dir" in args or "-m" in argv or "--multirun" in argv:
        return argv
    if args["ckpt_path"] in ("", "null"):
        return argv
    run_dir = _run_of_checkpoint(args["ckpt_path"], outputs, cwd)
    if run_dir is None:
        return argv
    ckpt = [a for a in argv if a.startswith("ckpt_path=")]
    if args["ckpt_path"] == "last":  # the run folder is fixed now; "last" is its checkpoints/last.ckpt
        ckpt = [f"ckpt_path={run_dir / CHECKPOINT_DIR / 'last.ckpt'}"]
    rest = [a for a in argv if not a.startswith("ckpt_path=")]
    # Hydra writes nothing into the run folder (.hydra/ keeps the overrides the run was started with).
    return [*replayed_overrides(run_dir), *rest, *ckpt, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]
