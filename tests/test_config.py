"""The config tree composes for every backbone and dataset, and run folders never collide."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from skinlesion.config import CONFIG_DIR

from conftest import compose_config

BACKBONES = ["resnet50", "densenet121", "mobilenetv2", "efficientnet_b0", "inception_v3"]
TIMM_NAMES = {
    "resnet50": "resnet50.a1_in1k",
    "densenet121": "densenet121.ra_in1k",
    "mobilenetv2": "mobilenetv2_100.ra_in1k",
    "efficientnet_b0": "efficientnet_b0.ra_in1k",
    "inception_v3": "inception_v3.tv_in1k",
}


def test_every_backbone_has_a_model_file() -> None:
    offline = ["efficientnet_lite0"]  # packaged ImageNet weights for demos and tests, not in the default sweep
    assert sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")) == sorted(BACKBONES + offline)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("data", ["synthetic", "ham10000"])
def test_train_config_composes(backbone: str, data: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"model={backbone}", f"data={data}", f"paths.root_dir={tmp_path}"])
    assert cfg.model.name == backbone
    assert cfg.model.timm_name == TIMM_NAMES[backbone]
    assert cfg.model.pretrained is True  # ImageNet weights are the promise; tests switch them off
    assert cfg.module.model.name == backbone  # the LightningModule gets the selected backbone
    assert cfg.data._target_.endswith("SkinLesionDataModule")
    assert cfg.monitor == "val/balanced_acc"
    if data == "synthetic":
        assert cfg.data.root.startswith(str(tmp_path / "data" / "synthetic"))
    else:
        assert cfg.data.root == str(tmp_path / "data" / "HAM10000")


def test_data_root_follows_the_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SKINLESION_DATA_ROOT", str(tmp_path / "elsewhere"))
    cfg = compose_config("train", [f"paths.root_dir={tmp_path}"])
    assert cfg.data.root == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("name", ["demo", "paper", "benchmark"])
def test_experiments_compose(name: str, tmp_path: Path) -> None:
    overrides = [f"experiment={name}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}"]
    cfg = compose_config("train", overrides)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_two_runs_started_in_the_same_second_get_different_folders(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        first, second = (
            compose("train", [f"paths.root_dir={tmp_path}", "model=densenet121"], return_hydra_config=True)
            for _ in range(2)
        )
        dirs = [cfg.hydra.run.dir for cfg in (first, second)]
        subdir = OmegaConf.to_container(first.hydra.sweep, resolve=False)["subdir"]
    assert dirs[0] != dirs[1]
    assert all(d.startswith(str(tmp_path / "outputs" / "train" / "runs")) and "densenet121" in d for d in dirs)
    assert "${" not in dirs[0]
    # multirun sub-folders carry the backbone: <job number>_<run_name>_seed<seed>, run_name = model.name
    assert "${run_name}" in subdir and first.run_name == "densenet121"


def test_cudnn_autotuning_is_on_for_gpu_training_unless_deterministic(monkeypatch, tmp_path: Path) -> None:
    paths = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    assert compose_config("train", paths).trainer.benchmark is False  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for trainer in ("default", "gpu"):
        assert compose_config("train", [*paths, f"trainer={trainer}"]).trainer.benchmark is True
    assert compose_config("train", [*paths, "trainer.deterministic=true"]).trainer.benchmark is False
