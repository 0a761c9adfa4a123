"""Resuming from the run folder alone: the run's own settings, and a refusal of settings that change it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from skinlesion.errors import ConfigError
from skinlesion.runfolder.resume import accepted_on_resume, check_resume, config_changes

from conftest import USER_TINY, compose_config, run_user


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file's hash but ``train.log``'s, the command log to which each command in the folder appends."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != "train.log")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(run: Path, command: str) -> str:
    """The one error line of a refused ``resume`` or ``evaluate`` of ``run``; the run folder is left as it was."""
    before = folder_digest(run)
    if command == "resume":
        args = ["skinlesion.train", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=3"]
    else:
        args = ["skinlesion.evaluate", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}"]
    result = run_user(run.parent, "python", "-m", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert folder_digest(run) == before
    return line


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("user")
    result = run_user(home, "python", "-m", "skinlesion.train", *USER_TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (home / "outputs" / "train" / "runs").iterdir()
    return run


@pytest.fixture
def finished_run(trained_once: Path, tmp_path: Path) -> Path:
    """A copy of the run folder (its data stays where the run read it), for one test to resume."""
    return Path(shutil.copytree(trained_once, tmp_path / "outputs" / "train" / "runs" / trained_once.name))


@pytest.mark.slow
def test_resume_with_only_the_checkpoint_continues_the_run_with_its_own_settings(
    finished_run: Path, tmp_path: Path
) -> None:
    config = (finished_run / "config.yaml").read_bytes()
    last = finished_run / "checkpoints" / "last.ckpt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # another working folder: the run's data and outputs stay where they were
    result = run_user(elsewhere, "python", "-m", "skinlesion.train", f"ckpt_path={last}", "trainer.max_epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (finished_run / "config.yaml").read_bytes() == config
    assert list((tmp_path / "outputs" / "train" / "runs").iterdir()) == [finished_run]
    assert not (elsewhere / "outputs").exists()
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3
    (resume,) = json.loads((finished_run / "resumes.json").read_text())
    assert resume["overrides"] == ["trainer.max_epochs=3"]
    assert resume["changes"].pop("trainer.max_epochs") == {"from": 2, "to": 3}
    assert all(str(finished_run) in change["to"] for change in resume["changes"].values())  # the copy's folders

    # Later: `ckpt_path=last` from inside the run folder replays the raised epoch count too.
    again = run_user(finished_run, "python", "-m", "skinlesion.train", "ckpt_path=last", "trainer.max_epochs=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(last, weights_only=True)["epoch"] == 3
    assert (finished_run / "config.yaml").read_bytes() == config


@pytest.mark.slow
def test_resume_with_settings_that_change_the_training_is_refused_and_touches_nothing(finished_run: Path) -> None:
    before = folder_digest(finished_run)
    last = finished_run / "checkpoints" / "last.ckpt"
    result = run_user(
        finished_run.parent, "python", "-m", "skinlesion.train", f"ckpt_path={last}", "data.image_size=64",
        "optimizer.lr=0.5",
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "data.image_size: 32 -> 64" in line and "optimizer.lr: 0.001 -> 0.5" in line
    assert "Traceback" not in result.stderr
    assert folder_digest(finished_run) == before


@pytest.fixture
def one_image_fewer(trained_once: Path):
    """The run's data folder with one listed image dropped from its metadata (restored afterwards)."""
    (metadata,) = (trained_once.parents[3] / "data" / "synthetic").glob("*/HAM10000_metadata.csv")
    original = metadata.read_text()
    lines = original.splitlines(keepends=True)
    metadata.write_text("".join(lines[:1] + lines[2:]))
    yield
    metadata.write_text(original)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_a_run_whose_data_changed_is_neither_resumed_nor_evaluated(
    finished_run: Path, one_image_fewer: None, command: str
) -> None:
    """Its split would be rebuilt from the data as it is now: val/test would not be the images it was tested on."""
    line = refused(finished_run, command)
    assert "no longer gives the split" in line and "1 image(s) missing" in line, line


@pytest.mark.slow
def test_evaluate_can_score_exactly_the_listed_images_that_still_exist(
    trained_once: Path, finished_run: Path, one_image_fewer: None, tmp_path: Path
) -> None:
    listed = pd.read_csv(finished_run / "split.csv", dtype={"image_id": str})
    (metadata,) = (trained_once.parents[3] / "data" / "synthetic").glob("*/HAM10000_metadata.csv")
    gone = set(listed["image_id"]) - set(pd.read_csv(metadata, dtype={"image_id": str})["image_id"])
    (gone_split,) = listed[listed["image_id"].isin(gone)]["split"]
    split = "val" if gone_split == "val" else "test"
    best = finished_run / "checkpoints" / "best.ckpt"
    result = run_user(tmp_path, "python", "-m", "skinlesion.evaluate", f"ckpt_path={best}", f"split={split}",
                      "split_from=file")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "evaluate" / "runs").iterdir()
    summary = json.loads((folder / "metrics.json").read_text())
    in_split = int((listed["split"] == split).sum())
    assert summary["images"] == in_split - (gone_split == split)
    check = summary["split_check"]
    assert check["split_from"] == "file" and check["listed"] == len(listed) and check["found"] == len(listed) - 1
    assert check["missing"] == {gone_split: 1} and check["not_listed"] == 0
    scored = pd.read_csv(folder / f"predictions_{split}.csv", dtype={"image_id": str})["image_id"]
    assert set(scored) == set(listed.query("split == @split")["image_id"]) - gone


@pytest.fixture
def data_moved(trained_once: Path):
    """The run's synthetic data folder moved elsewhere (moved back afterwards)."""
    (root,) = (trained_once.parents[3] / "data" / "synthetic").iterdir()
    moved = root.with_name("moved")
    root.rename(moved)
    yield root
    moved.rename(root)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_a_run_whose_synthetic_data_moved_gets_no_new_set_in_its_place(
    finished_run: Path, data_moved: Path, command: str
) -> None:
    line = refused(finished_run, command)
    assert f"no synthetic dataset at data.root={data_moved}" in line and "only training generates one" in line
    assert not data_moved.exists() and not data_moved.with_name(data_moved.name + ".partial").exists()


def test_training_refuses_to_generate_synthetic_data_next_to_the_users_files(tmp_path: Path) -> None:
    mine = tmp_path / "my_images"
    mine.mkdir()
    (mine / "ISIC_0000001.jpg").write_bytes(b"not generated here")
    result = run_user(tmp_path, "python", "-m", "skinlesion.train", *USER_TINY, f"data.root={mine}")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"{mine} already holds files" in line
    assert [p.name for p in mine.iterdir()] == ["ISIC_0000001.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_images", "outputs"]


def test_settings_added_later_only_for_display_and_logging_are_accepted_on_resume() -> None:
    """Settings added later that only decide what is shown or logged are absent from an older config.yaml."""
    saved = {"seed": 0, "callbacks": {"history": {"_target_": "H"}}}
    current = saved | {
        "print_config": True,
        "tracking": {"log_checkpoint": False},
        "callbacks": {"history": {"_target_": "H"}, "lr_monitor": {"_target_": "L", "logging_interval": "step"}},
    }
    changes = config_changes(saved, current)
    assert set(changes) == {"print_config", "tracking.log_checkpoint", "callbacks.lr_monitor._target_",
                            "callbacks.lr_monitor.logging_interval"}  # fmt: skip
    assert all(accepted_on_resume(key, *change) for key, change in changes.items())
    assert not accepted_on_resume("optimizer.lr", 1e-3, 1e-2)


# The keys the ISIC leaders' options added to the train config (every default config.yaml before them lacks
# exactly these; metadata fusion and the new augmentations add keys only when switched on).
OPTION_KEYS = {
    "ema": ("enabled", "decay", "warmup"),
    "early_stopping": ("patience", "min_delta"),
    "finetune": ("layer_decay",),
    "module": ("layer_decay", "colour_constancy"),
}


def test_a_run_saved_before_the_training_options_resumes_with_them_off_but_not_on(tmp_path: Path) -> None:
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    old = OmegaConf.to_container(compose_config("train", paths), resolve=True)
    for section, keys in OPTION_KEYS.items():
        for key in keys:
            del old[section][key]
        if not old[section]:
            del old[section]
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    accepted = check_resume(compose_config("train", paths), tmp_path)
    assert set(accepted) == {f"{section}.{key}" for section, keys in OPTION_KEYS.items() for key in keys}
    assert accepted["ema.decay"] == ("<absent>", 0.999)
    switched_on = ["ema.enabled=true", "early_stopping.patience=2", "finetune.layer_decay=0.8",
                   "module.colour_constancy=6", "metadata=fusion", "+data.augment.mixup=0.2"]  # fmt: skip
    for option in switched_on:
        key = option.lstrip("+").split("=")[0].replace("metadata", "module.metadata")
        with pytest.raises(ConfigError, match=f"{key}[.:]"):
            check_resume(compose_config("train", [*paths, option]), tmp_path)


def test_a_fusion_run_saved_before_drop_all_resumes_only_without_it(tmp_path: Path) -> None:
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}", "metadata=fusion"]
    old = OmegaConf.to_container(compose_config("train", paths), resolve=True)
    del old["module"]["metadata"]["drop_all"]
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"module\.metadata\.drop_all: '<absent>' -> 0\.1"):
        check_resume(compose_config("train", paths), tmp_path)
    accepted = check_resume(compose_config("train", [*paths, "module.metadata.drop_all=0"]), tmp_path)
    assert accepted == {"module.metadata.drop_all": ("<absent>", 0)}
