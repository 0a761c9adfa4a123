"""The entry point's bad-input paths end in one clear line and a non-zero exit code."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from skinlesion.cli import check_group_choices, one_line
from skinlesion.errors import ConfigError, DataError
from skinlesion.runfolder.resume import accepted_on_resume, config_changes, resume_arguments

from conftest import run_cli


def run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(tmp_path, "skinlesion.train", f"paths.root_dir={tmp_path}", *args, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_unknown_backbone_names_the_choices(tmp_path: Path) -> None:
    result = run_train(tmp_path, "model=foo")
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "unknown model 'foo'" in line
    for name in ("densenet121", "efficientnet_b0", "inception_v3", "mobilenetv2", "resnet50"):
        assert name in line
    assert "Traceback" not in result.stderr


def test_missing_dataset_says_where_it_looked_and_how_to_proceed(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    result = run_train(tmp_path, f"data.root={missing}", "model.pretrained=false")
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert str(missing) in line
    assert "download" in line.lower() and "data=synthetic" in line
    assert "Traceback" not in result.stderr


def test_group_choice_check_accepts_sweeps_and_rejects_typos() -> None:
    check_group_choices(["model=resnet50,densenet121", "data=synthetic", "trainer.max_epochs=3", "seed=1"])
    check_group_choices(["model=glob(*)", "hydra/launcher=submitit_local", "+experiment=demo"])
    with pytest.raises(ConfigError, match="unknown data 'synthtic'"):
        check_group_choices(["data=synthtic"])
    with pytest.raises(ConfigError, match="unknown model 'resnet5'"):
        check_group_choices(["-m", "model=resnet50,resnet5"])


def test_resume_continues_in_the_folder_that_wrote_the_checkpoint(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    older, newer = (outputs / task / "runs" / name for task, name in (("train", "a"), ("demo", "b")))
    for run in (older, newer):
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(f"seed: 0\npaths:\n  root_dir: {tmp_path}\n")
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (older / ".hydra").mkdir()
    (older / ".hydra" / "overrides.yaml").write_text("- model=mobilenetv2\n- ckpt_path=old\n")
    os.utime(older / "checkpoints" / "last.ckpt", (1, 1))
    checkpoint = older / "checkpoints" / "last.ckpt"
    tail = ["hydra.output_subdir=null"]
    replay = ["model=mobilenetv2", f"paths.root_dir={tmp_path}"]
    assert resume_arguments([f"ckpt_path={checkpoint}", "trainer.max_epochs=5"], outputs, tmp_path) == [
        *replay,
        "trainer.max_epochs=5",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={older.resolve()}",
        *tail,
    ]
    newest = [f"paths.root_dir={tmp_path}", f"ckpt_path={newer.resolve() / 'checkpoints' / 'last.ckpt'}"]
    assert resume_arguments(["ckpt_path=last"], outputs, tmp_path) == [*newest, f"hydra.run.dir={newer}", *tail]
    inside = resume_arguments(["ckpt_path=last"], outputs, older)  # started in a run folder: that run
    assert f"hydra.run.dir={older.resolve()}" in inside
    for untouched in (["ckpt_path=last", "hydra.run.dir=/x"], ["model=resnet50"], ["-m", f"ckpt_path={checkpoint}"]):
        assert resume_arguments(untouched, outputs, tmp_path) == untouched


def test_resume_accepts_only_changes_that_cannot_alter_what_was_trained() -> None:
    saved = {"trainer": {"max_epochs": 2, "enable_progress_bar": True}, "optimizer": {"lr": 0.001}, "seed": 0}
    watched = {"trainer": {"max_epochs": 4, "enable_progress_bar": False}, "optimizer": {"lr": 0.001}, "seed": 0}
    changes = config_changes(saved, watched)
    assert changes == {"trainer.enable_progress_bar": (True, False), "trainer.max_epochs": (2, 4)}
    assert all(accepted_on_resume(key, *change) for key, change in changes.items())
    assert not accepted_on_resume("trainer.max_epochs", 4, 2)  # fewer epochs would rewrite what the run did
    assert not accepted_on_resume("optimizer.lr", 0.001, 0.01)
    assert config_changes(saved, {**saved, "loss": {"gamma": 2}}) == {"loss.gamma": ("<absent>", 2)}


def test_an_error_raised_in_a_dataloader_worker_prints_as_one_line() -> None:
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("/data/x.jpg: truncated file; fix or remove it")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as info:
        wrapped.reraise()  # what the main process sees: the worker's traceback inside the message
    assert "Original Traceback" in str(info.value)
    assert one_line(info.value) == "/data/x.jpg: truncated file; fix or remove it"
    assert one_line(ConfigError("plain")) == "plain"
