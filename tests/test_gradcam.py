"""Grad-CAM for every backbone, a trained model that looks at the lesion, galleries and explain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from skinlesion.config import CONFIG_DIR
from skinlesion.data.dataset import to_chw_tensor
from skinlesion.data.images import load_rgb
from skinlesion.data.layouts import HAM_METADATA, load_records
from skinlesion.data.synthetic import GEOMETRY_FILE, generate
from skinlesion.data.transforms import eval_transform
from skinlesion.errors import ConfigError
from skinlesion.explain import explain
from skinlesion.gradcam.explanation import Explanation
from skinlesion.gradcam.figures import plot_explanation
from skinlesion.gradcam.maps import compute_cams
from skinlesion.inference.model import InferenceModel
from skinlesion.labels import CLASSES
from skinlesion.models.module import SkinLesionClassifier
from skinlesion.train import train

from conftest import FROM_SCRATCH, compose_config, tiny_train_overrides

# The last spatial feature map of each backbone (the input of its global pooling), as timm names it.
GRADCAM_LAYERS = {
    "resnet50": "layer4",
    "densenet121": "features.norm5",
    "mobilenetv2": "bn2",
    "efficientnet_b0": "bn2",
    "inception_v3": "Mixed_7c",
}
# Stride-32 maps are 2x2 at 64 px. InceptionV3's valid convolutions leave Mixed_7c at 1x1 (a constant
# heatmap) up to 106 px, so it needs 107.
INPUT_SIZES = {"resnet50": 64, "densenet121": 64, "mobilenetv2": 64, "efficientnet_b0": 64, "inception_v3": 107}


def random_classifier(backbone: str, size: int) -> SkinLesionClassifier:
    torch.manual_seed(0)
    spec = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{backbone}.yaml"))
    return SkinLesionClassifier(model={**spec, "pretrained": False}, image_size=size).eval()


def model_inputs(model: SkinLesionClassifier, images: list[np.ndarray]) -> torch.Tensor:
    transform = eval_transform(model.preprocessing)
    return torch.stack([to_chw_tensor(transform(image=image)["image"]) for image in images])


@pytest.fixture(scope="module")
def lesion_images(synthetic_root: Path) -> list[np.ndarray]:
    return [load_rgb(path) for path in load_records(synthetic_root)["path"].head(2)]


@pytest.mark.parametrize("backbone", GRADCAM_LAYERS)
def test_heatmap_for_every_backbone(backbone: str, lesion_images: list[np.ndarray], tmp_path: Path) -> None:
    size = INPUT_SIZES[backbone]
    model = random_classifier(backbone, size)
    layer = model.gradcam_layer()
    assert layer is model.backbone.get_submodule(GRADCAM_LAYERS[backbone])
    seen = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    features = model.backbone.forward_features(torch.randn(1, 3, size, size))
    handle.remove()
    assert torch.equal(seen[0], features)  # the configured layer is the backbone's final feature map

    inputs = model_inputs(model, lesion_images)
    cams = compute_cams(model, inputs, "gradcam")

    assert cams.shape == (2, size, size)
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    assert all(cam.max() - cam.min() > 0.5 for cam in cams)  # not constant
    assert not any(m._forward_hooks for m in model.modules())  # pytorch-grad-cam's hooks were released
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training

    probs = model.predict_proba(inputs).detach().numpy()
    item = Explanation.build("lesion.jpg", lesion_images[0], cams[0], probs[0], model.preprocessing, False, 4)
    assert item.cam.shape == lesion_images[0].shape[:2]  # drawn on the original, not on the squashed input
    figure = tmp_path / "lesion.png"
    plot_explanation(item, CLASSES, figure, "gradcam")
    assert cv2.imread(str(figure)) is not None


@pytest.mark.parametrize("method", ["gradcam++", "eigencam"])
def test_other_methods_and_a_frozen_backbone(method: str, lesion_images: list[np.ndarray]) -> None:
    model = random_classifier("mobilenetv2", 64)
    model.requires_grad_(False)  # as after stage 1 of fine-tuning: gradients still reach the CAM layer
    cams = compute_cams(model, model_inputs(model, lesion_images), method, targets=[3, 4])
    assert cams.shape == (2, 64, 64) and all(cam.max() - cam.min() > 0.5 for cam in cams)
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_method_is_a_config_error(lesion_images: list[np.ndarray]) -> None:
    model = random_classifier("mobilenetv2", 32)
    with pytest.raises(ConfigError, match="method=scorecam is not supported; choose one of gradcam, gradcam"):
        compute_cams(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "scorecam")


# ---- a trained model ------------------------------------------------------------------------------------
CROP_OFFSETS = (13, 57)  # left edges of 90 px windows of a 160 px wide image: the lesion lands left or right


@pytest.fixture(scope="module")
def off_centre_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set with lesions off the image centre: generated at 160x90, each image cropped to a
    90x90 window that puts the lesion about 22 px left or right of the centre (the generator centres
    lesions, and a heatmap that merely favours the centre would pass a test on centred lesions)."""
    wide = generate(
        tmp_path_factory.mktemp("wide") / "ham", n_images=420, seed=0, width=160, height=90, min_lesions_per_class=10
    )
    root = tmp_path_factory.mktemp("off-centre") / "ham"
    geometry = pd.read_csv(wide / GEOMETRY_FILE)
    paths = load_records(wide).set_index("image_id")["path"]
    for i, image_id in enumerate(geometry["image_id"]):
        source = Path(paths[image_id])
        target = root / source.relative_to(wide)
        target.parent.mkdir(parents=True, exist_ok=True)
        left = CROP_OFFSETS[i % 2]
        cv2.imwrite(str(target), cv2.imread(str(source))[:, left : left + 90], [cv2.IMWRITE_JPEG_QUALITY, 95])
        geometry.loc[i, "cx"] -= left
    shutil.copy(wide / HAM_METADATA, root / HAM_METADATA)
    geometry.to_csv(root / GEOMETRY_FILE, index=False)
    return root


@pytest.fixture(scope="module")
def localising_run(tmp_path_factory: pytest.TempPathFactory, off_centre_root: Path, cache_dir: Path) -> Path:
    """A small ResNet (timm's resnet10t under the resnet50 config, so its blocks and Grad-CAM layer
    ``layer4``) trained from scratch for a few epochs at 64 px (2x2 final maps), gallery on."""
    out = tmp_path_factory.mktemp("trained")
    overrides = [
        *tiny_train_overrides(out, off_centre_root, cache_dir),
        "model=resnet50",
        "model.timm_name=resnet10t",
        "data.image_size=64",
        "trainer.max_epochs=5",
        *FROM_SCRATCH,
        "gallery.enabled=true",
        "gallery.per_class=1",
    ]
    train(compose_config("train", overrides))
    return out / "run"


def lesion_and_mirror_masks(geometry: pd.Series, height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """At the model input: the lesion's disc minus its mirror image through the centre, and vice versa."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5

    def disc(cx: float, cy: float) -> np.ndarray:
        dx, dy = (
            (xx - cx * size / width) / (geometry.rx * size / width),
            (yy - cy * size / height) / (geometry.ry * size / height),
        )
        return dx**2 + dy**2 <= 1

    lesion, mirror = disc(geometry.cx, geometry.cy), disc(width - geometry.cx, height - geometry.cy)
    return lesion & ~mirror, mirror & ~lesion


def lesion_preference(model: InferenceModel, root: Path) -> pd.Series:
    """Per class, the share of the dataset's images whose heatmap (predicted class) is hotter on the
    lesion than on the same area mirrored through the image centre, so that neither a preference for
    the centre nor a heatmap flipped or shifted against the image can pass."""
    records = load_records(root)
    geometry = pd.read_csv(root / GEOMETRY_FILE).set_index("image_id")
    size = model.model.preprocessing.image_size
    inputs, masks, classes = [], [], []
    for record in records.itertuples():
        original = model.read(record.path)
        lesion, mirror = lesion_and_mirror_masks(geometry.loc[record.image_id], *original.shape[:2], size)
        if lesion.mean() > 0.03 and mirror.mean() > 0.03:  # lesions too large to tell apart are skipped
            inputs.append(model.load_input(record.path))
            masks.append((lesion, mirror))
            classes.append(record.dx)
    assert len(inputs) >= 0.8 * len(records)
    cams = compute_cams(model.model, torch.stack(inputs), "gradcam")
    hotter = [cam[lesion].mean() > cam[mirror].mean() for cam, (lesion, mirror) in zip(cams, masks, strict=True)]
    return pd.Series(hotter).groupby(pd.Series(classes)).mean()


@pytest.mark.slow
def test_trained_heatmaps_look_at_the_lesion(localising_run: Path, off_centre_root: Path) -> None:
    """Averaged over classes: nv (2/3 of the images, as in HAM10000) can be recognised partly by the
    absence of the other classes' signs, and its heatmaps then sit on plain skin more often (seen: 42% to
    94% of nv images favour the lesion, 88% to 100% for most other classes)."""
    trained = InferenceModel.load(localising_run / "checkpoints" / "best.ckpt", "cpu")
    share = lesion_preference(trained, off_centre_root)
    assert share.mean() >= 0.6, f"class-averaged share of heatmaps hotter on the lesion: {share.round(2).to_dict()}"
    assert (share > 0.5).sum() >= 4  # most classes


@pytest.mark.slow
def test_training_leaves_a_gallery_and_calibration_report(localising_run: Path) -> None:
    table = pd.read_csv(localising_run / "gradcam" / "gallery.csv", keep_default_na=False)
    assert set(table["kind"]) <= {"correct", "wrong"} and len(table) >= 7
    assert ((table["kind"] == "correct") == (table["true"] == table["pred"])).all()
    for name in set(table["true"]):
        assert (localising_run / "gradcam" / f"gallery_{name}.png").is_file()

    summary = json.loads((localising_run / "metrics.json").read_text())
    metrics = summary["metrics"]
    for split in ("val", "test"):
        assert (localising_run / f"reliability_{split}.png").is_file()
        for name in ("ece", "ece_uncalibrated", "nll", "nll_uncalibrated"):
            assert 0.0 <= metrics[f"{split}/{name}"] < 10
    assert metrics["val/nll"] <= metrics["val/nll_uncalibrated"] + 1e-6  # fitted there: never worse
    stored = InferenceModel.load(localising_run / "checkpoints" / "best.ckpt", "cpu").model.temperature
    assert float(stored) == pytest.approx(summary["calibration"]["temperature"])


def test_explain_a_split_and_a_folder(trained_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    checkpoint = trained_run / "checkpoints" / "best.ckpt"
    base = [f"paths.root_dir={tmp_path}", f"ckpt_path={checkpoint}", "device=cpu"]

    split_run = tmp_path / "split"
    summary = explain(compose_config("explain", [*base, f"paths.output_dir={split_run}", "split=test", "per_class=1"]))
    table = pd.read_csv(split_run / "explanations.csv", keep_default_na=False)
    assert summary["images"] == len(table) >= 7
    assert all(Path(p).is_file() for p in table["panel"])  # a figure per shown image
    assert {f"gallery_{name}.png" for name in table["true"]} <= {p.name for p in split_run.glob("gallery_*.png")}

    folder = tmp_path / "mine"
    folder.mkdir()
    for path in load_records(synthetic_root)["path"].head(2):
        shutil.copy(path, folder)
    (folder / "notes.txt").write_text("not an image\n")
    images_run = tmp_path / "images"
    summary = explain(
        compose_config("explain", [*base, f"paths.output_dir={images_run}", f"images={folder}", "method=gradcam++"])
    )
    table = pd.read_csv(images_run / "explanations.csv", keep_default_na=False).set_index("path")
    assert summary["images"] == 3 and summary["failed"] == 1
    assert "not an image" in table.loc[str(folder / "notes.txt"), "error"]
    good = table[table["error"] == ""]
    assert len(good) == 2 and all(Path(p).is_file() for p in good["panel"])
    assert set(good["true"]) <= set(CLASSES) and all(good["true"])  # the dataset knows these images
