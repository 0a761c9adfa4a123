"""``python -m skinlesion.data.check`` runs the DataModule's checks and prints a summary table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from skinlesion.data.check import check_data

from conftest import REPO_ROOT, compose_config


def check_cfg(root: Path, out: Path, *overrides: str):
    return compose_config(
        "check", [f"data.root={root}", f"paths.root_dir={out}", f"paths.output_dir={out}", *overrides]
    )


def test_a_clean_dataset_reports_counts_per_class_and_split(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    summary = check_data(check_cfg(synthetic_root, tmp_path))
    assert summary["status"] == "ok" and summary["problems"] == []
    metadata = pd.read_csv(synthetic_root / "HAM10000_metadata.csv")
    assert {c: v["images"] for c, v in summary["per_class"].items()} == metadata["dx"].value_counts().to_dict()
    assert summary["per_class"]["df"]["lesions"] == metadata.loc[metadata["dx"] == "df", "lesion_id"].nunique()
    per_split = {s: sum(v.values()) for s, v in summary["per_split"].items()}
    assert sum(per_split.values()) == len(metadata) and per_split["val"] > 0 and per_split["test"] > 0
    printed = capsys.readouterr().out
    assert "class" in printed and "lesions" in printed and "no problems found" in printed
    assert json.loads((tmp_path / "check.json").read_text())["status"] == "ok"


def test_problems_are_listed_by_kind_and_the_split_is_still_checked(synthetic_root, tmp_path: Path, capsys) -> None:
    root = shutil.copytree(synthetic_root, tmp_path / "ham")
    images = sorted(root.glob("*/*.jpg"))
    images[0].unlink()
    images[1].unlink()
    images[2].write_bytes(b"")
    summary = check_data(check_cfg(root, tmp_path / "out", "data.split.num_folds=12", "data.split.fold=0"))
    problems = {(p["dataset"], p["problem"]): p["count"] for p in summary["problems"]}
    assert problems[("main", "missing file")] == 2 and problems[("main", "empty file")] == 1
    assert any(d == "split" and "too few lesions per class for data.split.num_folds=12" in p for d, p in problems)
    assert summary["images_listed"] == 420 and summary["images_usable"] == 417 and summary["per_split"] is None
    assert len(pd.read_csv(tmp_path / "out" / "bad_images.csv")) == 3
    printed = capsys.readouterr().out
    assert "problems found (3)" in printed and "[main] missing file: 2" in printed


def run_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skinlesion.data.check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "", "HOME": str(cwd), "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_the_command_exits_1_on_problems_and_2_when_the_data_cannot_be_read(synthetic_root, tmp_path: Path) -> None:
    root = shutil.copytree(synthetic_root, tmp_path / "ham")
    next(root.glob("*/*.jpg")).unlink()
    found = run_check(f"data.root={root}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert found.returncode == 1, found.stderr
    assert "[main] missing file: 1" in found.stdout and "unusable images are listed in" in found.stdout
    missing = run_check(f"data.root={tmp_path / 'nowhere'}", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: dataset folder not found:")


@pytest.mark.parametrize("data", ["ham10000", "isic2018", "synthetic", "ham10000_isic2018_test"])
def test_every_data_config_composes_for_the_check(data: str, tmp_path: Path) -> None:
    cfg = check_cfg(tmp_path, tmp_path, f"data={data}")
    assert cfg.data._target_ == "skinlesion.data.datamodule.SkinLesionDataModule"
