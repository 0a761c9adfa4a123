"""What every Hydra entry point shares: checked group choices, one-line errors, multirun failure handling.

Each ``python -m skinlesion.<tool>`` is a thin Hydra ``main`` over a plain function; this module turns
a :class:`SkinLesionError` into ``error: <message>`` and exit code 2 instead of a traceback, and in a
multirun turns any failure of one job into a NaN result so the other jobs go on (the job has already
recorded its error in its own run folder).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from skinlesion.config import CONFIG_DIR
from skinlesion.errors import ConfigError, SkinLesionError

log = logging.getLogger(__name__)
EXIT_USAGE = 2


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
    try:
        check_group_choices(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        fail(str(err))
    hydra_main()


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run ``task(cfg)`` inside a Hydra job with the project's error conventions."""
    try:
        return task(cfg)
    except SkinLesionError as err:
        if is_multirun():
            log.error("job failed: %s", err)
            return math.nan
        fail(str(err))
    except Exception:
        if is_multirun():
            log.exception("job failed")
            return math.nan
        raise
