"""Every console script of pyproject.toml works as installed: --help, a real run, and from a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from conftest import REPO_ROOT, USER_TINY, run_user

SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BIN = Path(sys.executable).parent


def test_the_wheel_lists_every_package_of_the_source_tree() -> None:
    """pyproject.toml lists the packages by hand (conf/ is mapped to skinlesion.conf); none may be missed."""
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO_ROOT).parts) for p in (REPO_ROOT / "skinlesion").rglob("__init__.py")}
    assert found | {"skinlesion.conf"} == listed


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_answers_help(script: str, tmp_path: Path) -> None:
    result = run_user(tmp_path, str(BIN / script), "--help", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower() or "powered by hydra" in result.stdout.lower()
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


@pytest.mark.slow
def test_the_train_script_runs_a_tiny_fit_with_one_readable_line_per_epoch(tmp_path: Path) -> None:
    """Captured output is not a terminal (as in CI, SLURM or ``> train.log``): no progress-bar redraws."""
    result = run_user(tmp_path, str(BIN / "skinlesion-train"), *USER_TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    output = result.stdout + result.stderr
    assert output.count("\r") <= 3 and "\x1b[" not in output
    printed = [line.split(" - ", 1)[1] for line in output.splitlines() if "[skinlesion.epochs]" in line]
    assert [line.split(":")[0] for line in printed] == ["epoch 0/1 stage 1", "epoch 1/1 stage 2"]
    for line in printed:
        for name in ("train/loss", "val/loss", "val/balanced_acc", "lr/head=", "lr/backbone=", "images/s"):
            assert name in line, (name, line)
    logged = [line.split(" - ", 1)[1] for line in (run / "train.log").read_text().splitlines() if "epochs]" in line]
    assert logged == printed


@pytest.mark.slow
def test_a_wheel_install_runs_its_commands_from_another_folder(tmp_path: Path) -> None:
    """The wheel (not the editable source tree) must carry the config package and the scripts."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."]
    subprocess.run(build, cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("skinlesion-*.whl")
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    assert (target / "skinlesion" / "conf" / "train.yaml").is_file()
    assert (target / "skinlesion" / "conf" / "model" / "resnet50.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env_path = {**os.environ, "PYTHONPATH": str(target)}  # before the editable install
    probe = "import skinlesion.config as c; print(c.CONFIG_DIR)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env_path, capture_output=True, text=True)
    assert where.stdout.strip() == str(target / "skinlesion" / "conf"), where.stderr
    script = shutil.which("skinlesion-evaluate", path=str(target / "bin"))
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=elsewhere, env=env_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "powered by Hydra" in result.stdout, result.stderr[-2000:]
