"""Where the Hydra config tree lives, and the resolvers it uses.

Importing this module registers the resolvers, so every entry point and every test that composes a
config imports it first.
"""

from __future__ import annotations

import os
import secrets
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

# The config tree is the package skinlesion.conf (conf/ in the repository, mapped by pyproject.toml), so
# `python -m`, the console scripts and a wheel install all load the same files the same way.
CONFIG_PACKAGE = "pkg://skinlesion.conf"
CONFIG_DIR = Path(str(files("skinlesion.conf")))


def _auto_precision() -> str:
    """bf16 mixed precision where the GPU supports it, full fp32 elsewhere (CPU runs, old GPUs)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# A short random token per config (cached): two runs started in the same second get different folders,
# while every job of one multirun shares the sweep folder (Hydra copies the resolver cache to its jobs).
OmegaConf.register_new_resolver("run_token", lambda: secrets.token_hex(3), use_cache=True, replace=True)
OmegaConf.register_new_resolver("auto_precision", _auto_precision, use_cache=True, replace=True)


def _auto_benchmark(deterministic: bool | None) -> bool:
    """cuDNN autotuning on a GPU: every batch has the same image size, so the fastest convolutions are found
    once; off where it cannot help (CPU) or would break ``trainer.deterministic``."""
    return torch.cuda.is_available() and not deterministic


OmegaConf.register_new_resolver("auto_benchmark", _auto_benchmark, replace=True)
# Progress bars only for a person at a terminal: redirected to a file (CI, SLURM, > train.log) each redraw
# is a line of carriage returns and cursor codes; the per-epoch line of TrainingHistory says what matters.
OmegaConf.register_new_resolver("stdout_is_tty", lambda: sys.stdout.isatty(), replace=True)


def project_root() -> str:
    """``$SKINLESION_HOME``, else the folder the command was started in (where ``outputs/`` and ``data/`` go).

    A resolver rather than ``${oc.env:...,${hydra:runtime.cwd}}``: Hydra's sweeper resolves the sweep folder
    before its own config exists, and oc.env resolves its default even when the variable is set.
    """
    home = os.environ.get("SKINLESION_HOME")
    if home:
        return str(Path(home).expanduser().resolve())
    from hydra.core.hydra_config import HydraConfig  # the launch folder, also in a job that changed folder

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else str(Path.cwd())


OmegaConf.register_new_resolver("project_root", project_root, replace=True)


def to_plain(value: Any) -> Any:
    """Plain dicts and lists instead of OmegaConf containers: checkpoints must load with weights_only."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def available_cpus() -> int:
    """CPUs this process may use: a SLURM job's share of a node, not the node's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
