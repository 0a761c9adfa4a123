"""The run's config as a Rich tree: printed when training starts and saved as ``config_tree.txt``.

``config.yaml`` is the machine-readable record; the tree is for the person at the terminal, who wants to
see before hours of training what the run will do and what the command line changed: the overrides are
listed first, and each overridden section and line is highlighted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text
from rich.tree import Tree

from skinlesion.runfolder.files import atomic_write

CONFIG_TREE_FILE = "config_tree.txt"
OVERRIDDEN = "bold yellow"


def command_line_overrides() -> list[str]:
    """The job's overrides (``optimizer.lr=3e-3``, ``model=resnet50``); none outside a Hydra job."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _overridden_keys(overrides: Sequence[str]) -> dict[str, list[list[str]]]:
    """Section -> key paths inside it that an override set (an empty path: the whole section, a group choice)."""
    keys: dict[str, list[list[str]]] = {}
    for override in overrides:
        path = override.split("=", 1)[0].lstrip("+~").split("@")[0].split(".")
        keys.setdefault(path[0], []).append(path[1:])
    return keys


def _lines_of(text: str, paths: list[list[str]]) -> set[int]:
    """The 1-based lines of a section's YAML where each key path is set (found by key and indentation)."""
    lines = text.splitlines()
    found = set()
    for path in filter(None, paths):
        start = 0
        for depth, key in enumerate(path):
            pattern = re.compile(rf"^{' ' * 2 * depth}{re.escape(key)}:")
            start = next((i for i in range(start, len(lines)) if pattern.match(lines[i])), None)
            if start is None:
                break
        if start is not None:
            found.add(start + 1)
    return found


def config_tree(cfg: DictConfig, overrides: Sequence[str] = ()) -> Tree:
    """One branch per top-level section (its YAML), the overrides first and highlighted."""
    tree = Tree("config", style="bold", guide_style="dim")
    if overrides:
        branch = tree.add(Text("overrides", style=OVERRIDDEN))
        for override in overrides:
            branch.add(Text(override, style=OVERRIDDEN))
    changed = _overridden_keys(overrides)
    for section, value in cfg.items():
        label = Text(str(section), style=OVERRIDDEN if section in changed else "bold")
        if section in changed:  # marked in words too: the saved text file has no colours
            label.append(" (overridden)", style=OVERRIDDEN)
        if isinstance(value, DictConfig):
            text = OmegaConf.to_yaml(value, resolve=True)
            lines = _lines_of(text, changed.get(str(section), []))
            tree.add(label).add(Syntax(text, "yaml", highlight_lines=lines, theme="ansi_dark", word_wrap=True))
        else:
            label.append(f": {OmegaConf.to_container(cfg, resolve=True)[section]}", style="default")
            tree.add(label)
    return tree


def show_config_tree(cfg: DictConfig, run_dir: Path | None, overrides: Sequence[str] | None = None) -> None:
    """Print the tree, and save it as plain text in ``run_dir`` (when given)."""
    console = Console(record=True, width=120)
    console.print(config_tree(cfg, command_line_overrides() if overrides is None else overrides))
    if run_dir is not None:
        text = console.export_text(styles=False)
        atomic_write(Path(run_dir) / CONFIG_TREE_FILE, lambda tmp: tmp.write_text(text))
