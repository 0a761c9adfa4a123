"""Impossible settings and unwritable output folders are refused before any work, in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from skinlesion.cli import user_error
from skinlesion.errors import ConfigError, FileSystemError, SettingError
from skinlesion.evaluate import evaluate
from skinlesion.settings import (
    EvaluateSettings,
    ExplainSettings,
    ExportSettings,
    PredictSettings,
    TrainSettings,
    check_settings,
)

from conftest import ONE_EPOCH, USER_TINY, compose_config, random_checkpoint, run_cli, run_user, sweep_overrides

TOOL_SCHEMAS = {
    "train": TrainSettings,
    "evaluate": EvaluateSettings,
    "predict": PredictSettings,
    "explain": ExplainSettings,
    "export": ExportSettings,
}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def refused_in_one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = error_lines(result)
    return line


def tiny_training(tmp_path: Path, synthetic_root: Path, cache_dir: Path, setting: str) -> list[str]:
    """The tiny one-epoch run (which today's code would complete) with ``setting`` in place of its own value."""
    key = setting.split("=", 1)[0]
    args = [*sweep_overrides(tmp_path, synthetic_root, cache_dir), *ONE_EPOCH, "model=mobilenetv2"]
    return [arg for arg in args if arg.split("=", 1)[0] != key] + [setting]


IMPOSSIBLE_TRAINING = [
    "data.image_size=0",  # was read as "unset": trained at 224 px
    "trainer.max_epochs=0",  # was "completed" with the test metrics of random weights
    "data.batch_size=0",
    "data.batch_size=-1",
    "optimizer.lr=-1",
    "data.split.val=1.5",
    "data.num_workers=-1",
    "ema.decay=1.5",
    "early_stopping.patience=0",
    "finetune.layer_decay=0",
]


@pytest.mark.parametrize("setting", IMPOSSIBLE_TRAINING)
def test_an_impossible_training_setting_is_refused_by_the_check(tmp_path: Path, setting: str) -> None:
    cfg = compose_config("train", [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", setting])
    with pytest.raises(SettingError) as info:
        check_settings(cfg, TrainSettings)
    assert str(info.value).startswith(f"{setting} is not allowed: it must be"), info.value


def test_impossible_training_settings_stop_the_command_in_one_line_before_any_work(
    tmp_path: Path, synthetic_root: Path, cache_dir: Path
) -> None:
    """The command line path: one ``error:`` line naming each setting; a failed run folder without data or fit."""
    bad = [s for s in IMPOSSIBLE_TRAINING if s != "data.batch_size=-1"]  # one value per key
    args = tiny_training(tmp_path, synthetic_root, cache_dir, bad[0])
    args = [a for a in args if a.split("=", 1)[0] not in {s.split("=", 1)[0] for s in bad}] + bad
    line = refused_in_one_line(run_cli(tmp_path, "skinlesion.train", *args))
    assert line.startswith("error: "), line
    assert all(f"{setting} is not allowed" in line for setting in bad), line
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    saved = json.loads((run / "metrics.json").read_text())  # the failure is recorded, for the sweep report
    assert saved["status"] == "failed" and bad[0] in saved["error"] and "metrics" not in saved
    assert not (run / "split.csv").exists() and not (run / "checkpoints").exists()  # no data read, nothing fitted


@pytest.mark.parametrize(
    ("tool", "overrides", "message"),
    [
        ("train", ["finetune.backbone_lr=0"], "finetune.backbone_lr=0 is not allowed: it must be greater than 0"),
        ("train", ["data.eval_batch_size=0"], "data.eval_batch_size=0 is not allowed"),
        ("train", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1 is not allowed"),
        ("train", ["data.image_size=32.5"], "data.image_size=32.5 is not allowed: it must be a valid integer"),
        ("train", ["data.split.val=0.5", "data.split.test=0.6"], "val + data.split.test = 1.1 leaves nothing"),
        ("train", ["data.augment.zoom=1"], "data.augment.zoom=1 is not allowed: it must be less than 1"),
        ("evaluate", ["data.eval_batch_size=0"], "data.eval_batch_size=0 is not allowed"),
        ("evaluate", ["tta_views=3"], "tta_views=3 is not allowed: it must be 2, 4 or 8"),
        ("predict", ["tta_views=3"], "tta_views=3 is not allowed: it must be 2, 4 or 8"),
        ("evaluate", ["tta_crops=3"], "tta_crops=3 is not allowed: it must be 1, 5 (corners + centre) or a square"),
        ("predict", ["tta_crops=4"], "tta_crops=4 crops an enlarged image, but tta_scales=[1.0] has no scale above 1"),
        ("train", ["+data.augment.randaugment=9.5"], "data.augment.randaugment=9.5 is not allowed: it must be a"),
        ("train", ["+data.augment.mix_prob=null"], "data.augment.mix_prob=null is not allowed: it must be a valid"),
        ("train", ["metadata=fusion", "module.metadata.fields=[age,foo]"], "module.metadata.fields=[age,foo] is not"),
        ("train", ["metadata=fusion", "module.metadata.field_dropout=1.5"], "module.metadata.field_dropout=1.5 is not"),
        ("train", ["metadata=fusion", "module.metadata.drop_all=-0.5"], "module.metadata.drop_all=-0.5 is not allowed"),
        ("train", ["metadata=fusion", "module.compile=true"], "set module.compile=false with metadata=fusion"),
        (
            "train",
            ["model=mobilenetv2", "model.blocks=[blocks.0]", "finetune.layer_decay=0.8"],
            "finetune.layer_decay needs model.blocks that hold every backbone parameter exactly once",
        ),
        ("evaluate", ["ensemble_method=vote"], "ensemble_method=vote is not allowed"),
        ("evaluate", ["ensemble_selection.rounds=0"], "ensemble_selection.rounds=0 is not allowed"),
        ("predict", ["tta_crops=0"], "tta_crops=0 is not allowed: it must be 1, 5"),
        ("predict", ["tta_scales=[0.5]"], "tta_scales=[0.5] is not allowed: give distinct factors >= 1"),
        ("predict", ["batch_size=0"], "batch_size=0 is not allowed: it must be greater than or equal to 1"),
        ("explain", ["per_class=0"], "per_class=0 is not allowed"),
        ("export", ["check.atol=0"], "check.atol=0 is not allowed: it must be greater than 0"),
    ],
)
def test_each_tool_names_the_setting_its_value_and_what_is_allowed(
    tmp_path: Path, tool: str, overrides: list[str], message: str
) -> None:
    cfg = compose_config(tool, [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(SettingError, match=re.escape(message)) as info:
        check_settings(cfg, TOOL_SCHEMAS[tool])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()  # checking writes nothing


def test_bad_metadata_settings_stop_training_in_one_line_before_the_run_folder_is_written(tmp_path: Path) -> None:
    result = run_user(tmp_path, "python", "-m", "skinlesion.train", *USER_TINY, "metadata=fusion",
                      "module.metadata.fields=[age,foo]")  # fmt: skip
    line = refused_in_one_line(result)
    assert line.startswith("error: module.metadata.fields=[age,foo] is not allowed"), line
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert not (run / "config.yaml").exists() and not (run / "split.csv").exists()  # no config, no data read
    assert not (tmp_path / "data").exists()  # the synthetic set was not generated either
    saved = json.loads((run / "metrics.json").read_text())  # only the failure, as for every refused setting
    assert saved["status"] == "failed" and "module.metadata.fields" in saved["error"] and "metrics" not in saved


def test_a_one_member_ensemble_selection_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    checkpoint = random_checkpoint(tmp_path / "ckpt" / "best.ckpt", "mobilenetv2", 32)
    saved = torch.load(checkpoint, weights_only=True)
    torch.save(saved | {"datamodule_hyper_parameters": {"root": str(tmp_path)}}, checkpoint)  # as training saves
    overrides = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'eval'}", f"ensemble=[{checkpoint}]"]
    with pytest.raises(ConfigError, match="ensemble_method=greedy needs two or more members"):
        evaluate(compose_config("evaluate", [*overrides, "ensemble_method=greedy"]))
    assert not (tmp_path / "eval").exists()


def test_several_bad_settings_are_named_together_on_one_line(tmp_path: Path) -> None:
    overrides = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}", "data.batch_size=0", "optimizer.lr=-1"]
    with pytest.raises(SettingError, match=r"data\.batch_size=0 .*; optimizer\.lr=-1 ") as info:
        check_settings(compose_config("train", overrides), TrainSettings)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("tool", sorted(TOOL_SCHEMAS))
def test_the_shipped_defaults_pass_the_check(tmp_path: Path, tool: str) -> None:
    cfg = compose_config(tool, [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"])
    check_settings(cfg, TOOL_SCHEMAS[tool])


@pytest.mark.parametrize(
    "overrides", [["experiment=demo"], ["experiment=benchmark"], ["experiment=paper"], ["scheduler=plateau"]]
)
def test_the_shipped_recipes_pass_the_check(tmp_path: Path, overrides: list[str]) -> None:
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"]
    check_settings(compose_config("train", [*paths, "loss=focal", "data.cache=false", *overrides]), TrainSettings)


# ---- output folders ------------------------------------------------------------------------------------
def uncreatable(tmp_path: Path) -> Path:
    """A folder no one can create, root included: its parent is a regular file."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder\n")
    return blocker / "sub"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "best.ckpt", "mobilenetv2", 32)


@pytest.fixture(scope="module")
def image(synthetic_root: Path) -> Path:
    return next(synthetic_root.rglob("*.jpg"))


def test_predict_into_a_folder_that_cannot_be_created_stops_before_inference(
    tmp_path: Path, checkpoint: Path, image: Path
) -> None:
    out = uncreatable(tmp_path) / "p.csv"
    result = run_cli(tmp_path, "skinlesion.predict", f"ckpt_path={checkpoint}", f"input={image}", f"out={out}")
    line = refused_in_one_line(result)
    assert f"out={out}" in line and "is a file, not a folder" in line
    assert not list(tmp_path.rglob("predict.json"))  # stopped before any image was predicted


@pytest.mark.parametrize("tool", ["skinlesion.train", pytest.param("skinlesion.predict", marks=pytest.mark.slow)])
def test_a_home_where_the_run_folder_cannot_be_created_is_one_line(
    tmp_path: Path, checkpoint: Path, image: Path, synthetic_root: Path, tool: str
) -> None:
    """As with a SKINLESION_HOME on a read-only filesystem: Hydra would fail to create the run folder."""
    home = uncreatable(tmp_path)
    args = [f"ckpt_path={checkpoint}", f"input={image}"] if tool.endswith("predict") else ["data=synthetic"]
    result = run_cli(tmp_path, tool, f"paths.root_dir={home}", *args, timeout=300)
    line = refused_in_one_line(result)
    assert f"cannot write to {home / 'outputs'}" in line and "SKINLESION_HOME" in line


@pytest.mark.slow
def test_a_run_folder_under_proc_is_refused(tmp_path: Path, checkpoint: Path, image: Path) -> None:
    """/proc says yes to os.access(W_OK) and still refuses new files."""
    result = run_cli(tmp_path, "skinlesion.predict", "paths.root_dir=/proc/skinlesion", f"ckpt_path={checkpoint}")
    assert "cannot create files in /proc" in refused_in_one_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(tmp_path: Path, checkpoint: Path, image: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run_cli(tmp_path, "skinlesion.predict", f"ckpt_path={checkpoint}", f"input={image}", f"out={locked}/p.csv")
    assert "Permission denied" in refused_in_one_line(result)


def test_an_os_error_on_an_output_path_reads_as_one_line() -> None:
    assert user_error(FileNotFoundError(2, "No such file or directory", "x")) is None  # may be a bug: traceback
    try:
        try:
            raise OSError(30, "Read-only file system", "/mnt/ro/run/metrics.json")
        except OSError as err:
            raise RuntimeError("Lightning wrapped it") from err
    except RuntimeError as wrapped:
        problem = user_error(wrapped)
    assert isinstance(problem, FileSystemError)
    assert str(problem).startswith("/mnt/ro/run/metrics.json: Read-only file system; check the path")
