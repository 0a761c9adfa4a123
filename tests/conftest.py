"""Shared fixtures: a tiny synthetic dataset (made once per session) and configs composed into tmp_path.

Every test runs on the CPU with random weights (``model.pretrained=false``) and tiny images; nothing is
downloaded. The real HAM10000 subset is used only where present (``ham_subset`` skips otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from skinlesion.config import CONFIG_DIR
from skinlesion.data.synthetic import generate
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.train import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

REPO_ROOT = Path(__file__).resolve().parents[1]
HAM_SUBSET = REPO_ROOT.parent / "shared" / "data" / "ham10000-subset"
# Small enough to generate in about a second, large enough for a grouped 70/15/15 split of every class.
TINY_SYNTHETIC = {"n_images": 420, "seed": 0, "width": 120, "height": 90, "min_lesions_per_class": 10}


def compose_config(name: str = "train", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with Hydra's compose API, as the entry points would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "ham10000", **TINY_SYNTHETIC)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image-cache")


def tiny_train_overrides(root: Path, data_root: Path, cache: Path) -> list[str]:
    """A CPU-sized training config: MobileNetV2 at 32 px, two epochs (stage 2 from epoch 1), no workers."""
    return [
        f"paths.root_dir={root}",
        f"paths.output_dir={root / 'run'}",
        "data=synthetic",
        f"data.root={data_root}",
        "data.synthetic=null",
        f"data.cache.dir={cache}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "model=mobilenetv2",
        "model.pretrained=false",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "finetune.unfreeze_at_epoch=1",
        "finetune.num_blocks=1",
        "gallery.enabled=false",
        "clinical.figures=false",  # a second or two per figure; trained_run draws them
    ]


@pytest.fixture
def train_cfg(tmp_path: Path, synthetic_root: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """``train_cfg("model=resnet50", ...)``: the tiny training config plus overrides, outputs in tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("train", tiny_train_overrides(tmp_path, synthetic_root, cache_dir) + list(overrides))

    return make


# Training from random weights, as in experiment=demo: everything trains from the first epoch, BatchNorm
# included (there are no ImageNet statistics to keep), at one learning rate.
FROM_SCRATCH = [
    "optimizer=adamw",
    "optimizer.lr=3e-3",
    "finetune.unfreeze_at_epoch=0",
    "finetune.num_blocks=all",
    "finetune.backbone_lr=3e-3",
    "finetune.bn=train",
]

# One short head-only epoch, scored on two batches: for tests about bookkeeping rather than learning.
ONE_EPOCH = [
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "finetune.unfreeze_at_epoch=null",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
]


def sweep_overrides(home: Path, data_root: Path, cache: Path) -> list[str]:
    """The tiny training config, with each job writing its own folder and the backbone left to the sweep."""
    fixed = ("paths.output_dir=", "model=")
    return [o for o in tiny_train_overrides(home, data_root, cache) if not o.startswith(fixed)]


def run_cli(home: Path, module: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m <module> args`` in ``home`` (also $SKINLESION_HOME), offline, output captured."""
    env = {**os.environ, "SKINLESION_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=timeout)


def only_sweep(home: Path) -> Path:
    """The one multirun folder a test's sweep wrote under ``home``."""
    (sweep,) = (home / "outputs" / "train" / "multiruns").iterdir()
    return sweep


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, cache_dir: Path) -> Path:
    """One tiny training run (a short head-only epoch), shared by the tests that need a real checkpoint."""
    root = tmp_path_factory.mktemp("trained-run")
    overrides = tiny_train_overrides(root, synthetic_root, cache_dir)
    overrides += ["trainer.max_epochs=1", "finetune.unfreeze_at_epoch=null", "+trainer.limit_train_batches=3"]
    train(compose_config("train", [*overrides, "clinical.figures=true"]))
    return root / "run"


def random_checkpoint(
    path: Path, backbone: str, image_size: int, temperature: float = 1.0, head_std: float | None = None
) -> Path:
    """A checkpoint as skinlesion.train saves one, with random weights and BatchNorm statistics from one batch.

    The statistics matter: with the initial ones, deep random networks produce logits of 1e8, where fp32
    rounding alone exceeds any tolerance and every softmax is one-hot. ``head_std`` replaces the new head's
    near-zero weights, whose probabilities are all but uniform.
    """
    torch.manual_seed(0)
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{backbone}.yaml"))
    model = SkinLesionClassifier(model={**spec, "pretrained": False}, image_size=image_size)
    for layer in model.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.momentum = None  # a cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        model.train()(torch.randn(32, 3, image_size, image_size))
        if head_std is not None:
            model.backbone.get_classifier().weight.normal_(0, head_std)
    model.temperature.fill_(temperature)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture
def ham_subset() -> Path:
    if not (HAM_SUBSET / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 subset not present at {HAM_SUBSET} (only on development machines)")
    return HAM_SUBSET


# What a user appends to any README training command to make it CPU-tiny: nothing about paths.
USER_TINY = [
    "data=synthetic",
    "data.synthetic.n_images=200",
    "data.synthetic.width=120",
    "data.synthetic.height=90",
    "data.image_size=32",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.pretrained=false",
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "+trainer.limit_train_batches=2",
    "finetune.unfreeze_at_epoch=1",
    "gallery.enabled=false",
    "clinical.figures=false",
]


def run_user(cwd: Path, *command: str, home: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """A command as a user types it, in ``cwd``, offline, with ``$SKINLESION_HOME`` unset unless ``home``."""
    env = {k: v for k, v in os.environ.items() if k != "SKINLESION_HOME"} | {"HF_HUB_OFFLINE": "1"}
    if home is not None:
        env["SKINLESION_HOME"] = str(home)
    argv = [sys.executable, *command[1:]] if command[0] == "python" else list(command)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


LONGEST_FIRST = ("test_readme.py",)  # minutes each: started first, so no xdist worker is left with it at the end


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order
