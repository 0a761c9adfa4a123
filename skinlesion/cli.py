"""What every Hydra entry point shares: checked group choices, one-line errors, multirun failure handling.

Each ``python -m skinlesion.<tool>`` is a thin Hydra ``main`` (:func:`hydra_command`) over a plain
function; this module turns a :class:`SkinLesionError` into ``error: <message>`` and exit code 2 instead
of a traceback, and in a multirun turns any failure of one job into a NaN result so the other jobs go
on (the job has already recorded its error in its own run folder); the command still exits with status
1 at the end, after the sweep's report is written, so scripts and CI see that a job failed.
"""

from __future__ import annotations

import errno
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from skinlesion.config import CONFIG_DIR, CONFIG_PACKAGE
from skinlesion.errors import ConfigError, FileSystemError, SkinLesionError
from skinlesion.runfolder.files import check_writable

log = logging.getLogger(__name__)
EXIT_USAGE = 2
EXIT_JOBS_FAILED = 1
# Run folder -> error of each multirun job that failed in this process or that the sweep report found;
# launch() turns a non-empty record into exit status 1 once Hydra is done (report written).
FAILED_JOBS: dict[str, str] = {}
# OSErrors that are about the machine, not the code: the user fixes them (a path, permissions, disk space).
FILESYSTEM_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR}
RUN_FOLDER_FIX = "set SKINLESION_HOME (or paths.root_dir) to a folder that can be written"
T = TypeVar("T")


class _DropAdverts(logging.Filter):
    """Lightning prints a cloud-logging advert at every fit; it is not about the user's run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def check_group_choices(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> None:
    """Fail fast, in one line, on ``group=choice`` overrides naming a config file that does not exist."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("+", "~", "-")):
            continue
        key, value = arg.split("=", 1)
        group = config_dir / key
        if "." in key or key.startswith("hydra") or not group.is_dir():
            continue
        if any(ch in value for ch in "()[]{}$"):  # sweep functions and interpolations: leave them to Hydra
            continue
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for choice in value.split(","):
            if choice and choice != "null" and choice not in options:
                raise ConfigError(f"unknown {key} '{choice}'; available {key} choices: {', '.join(options)}")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def launch(hydra_main: Callable[[], Any], argv: Sequence[str] | None = None) -> None:
    """Console-script body: validate group choices, then hand over to Hydra."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    try:
        check_group_choices(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        fail(str(err))
    FAILED_JOBS.clear()
    hydra_main()
    if FAILED_JOBS:
        for run, error in FAILED_JOBS.items():
            print(f"failed: {run}: {error}", file=sys.stderr)
        print(f"error: {len(FAILED_JOBS)} job(s) of the multirun failed (listed above)", file=sys.stderr)
        raise SystemExit(EXIT_JOBS_FAILED)


def key_value_arguments(argv: Sequence[str], allowed: set[str], usage: str, required: set[str] = frozenset()) -> dict:
    """``key=value`` arguments, as the Hydra tools take them, for the tools that are not Hydra apps.

    ``--help`` prints the usage and exits 0; an unknown or missing key is one ``error:`` line (exit 2).
    """
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage)
        raise SystemExit(0)
    malformed = [arg for arg in argv if "=" not in arg]
    if malformed:
        fail(f"expected key=value arguments, got {' '.join(malformed)}; {usage}")
    values = OmegaConf.to_container(OmegaConf.from_cli(list(argv)))
    unknown = set(values) - allowed
    if unknown:
        fail(f"unknown option(s) {', '.join(sorted(unknown))}; {usage}")
    missing = required - set(values)
    if missing:
        fail(f"missing {', '.join(sorted(missing))}; {usage}")
    return values


class OutputFolderCheck(Callback):
    """Hydra callback (conf/hydra/default.yaml): an unwritable run or sweep folder is one line, before Hydra
    tries to create it (its own failure to create one is four chained tracebacks)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, setting: str) -> None:
        try:  # Hydra turns a callback's exception into a warning; SystemExit gets through
            check_writable(folder, setting, RUN_FOLDER_FIX)
        except SkinLesionError as err:
            fail(str(err))


class CreateSweepFolder(Callback):
    """Hydra callback (conf/hparams_search/): the sweep folder before the sweeper starts, which opens its
    Optuna storage there (SQLite creates the file but not its folder; Hydra's launcher makes it later)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failed_job(run_dir: str | Path, error: str) -> None:
    FAILED_JOBS[str(Path(run_dir).resolve())] = error


def one_line(problem: SkinLesionError) -> str:
    """The message alone, also for an error re-raised by a DataLoader worker (torch prepends the worker's
    traceback and ends with ``<module>.<Error>: <message>``)."""
    text = str(problem)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def user_error(err: BaseException) -> SkinLesionError | None:
    """The SkinLesionError behind ``err``, also when Hydra's instantiate or Lightning wrapped it; an OSError
    about permissions, a read-only filesystem or disk space counts as one (:data:`FILESYSTEM_ERRNOS`)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SkinLesionError):
            return err
        if isinstance(err, OSError) and err.errno in FILESYSTEM_ERRNOS:
            where = f"{err.filename}: " if err.filename else ""
            return FileSystemError(f"{where}{err.strerror}; check the path, its permissions and the free disk space")
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_task(task: Callable[[DictConfig], T], cfg: DictConfig) -> T | None:
    """Run ``task(cfg)`` inside a Hydra job with the project's error conventions; None for a failed multirun job."""
    try:
        return task(cfg)
    except Exception as err:
        problem = user_error(err)
        if is_multirun():
            log.error("job failed: %s", problem or err, exc_info=problem is None)
            cause = one_line(problem) if problem else str(err)
            record_failed_job(HydraConfig.get().runtime.output_dir, f"{type(problem or err).__name__}: {cause}")
            return None
        if problem is None:
            raise
        fail(one_line(problem))


def hydra_command(
    task: Callable[[DictConfig], T], config_name: str, finish: Callable[[T, DictConfig], float | None] | None = None
) -> Callable[[], None]:
    """The ``main`` of a command: Hydra over ``task`` with the project's conventions, then ``finish(result, cfg)``
    (what the command prints, and the value a sweeper optimises) when the task returned a result.

    Every command's primary config names its job (``hydra.job.name``): Hydra would otherwise name it after
    this module, and the job name is the log file's name and how run folders tell training runs apart.
    """

    @hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name=config_name)
    def hydra_main(cfg: DictConfig) -> float | None:
        result = run_task(task, cfg)
        if result is None:  # a failed multirun job (recorded), or a DDP rank other than 0
            return math.nan
        return finish(result, cfg) if finish is not None else None

    def main() -> None:
        launch(hydra_main)

    return main
