"""The ISIC leaders' augmentations: hair, RandAugment/TrivialAugment, erasing (in the loader, on uint8) and
mixup/CutMix (on the device, with soft targets and the class-weighted losses that read them)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from skinlesion.data.dataset import LesionDataset
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.data.specs import AugmentSpec
from skinlesion.data.transforms import train_transform
from skinlesion.errors import SettingError
from skinlesion.models.losses import CrossEntropy, FocalLoss
from skinlesion.models.mixing import BatchMixer
from skinlesion.settings import TrainSettings, check_settings

from conftest import USER_TINY, compose_config, run_user

PRE = Preprocessing(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
NEW = {"hair": 1.0, "randaugment": 9, "trivial_augment": True, "erase": 1.0}
ALL_NEW = {"hair": 0.5, "randaugment": 9, "erase": 0.5}  # RandAugment and TrivialAugment are alternatives
ALL_NEW_CLI = [f"+data.augment.{key}={value}" for key, value in ALL_NEW.items()]
MIX_CLI = ["+data.augment.mixup=0.4", "+data.augment.cutmix=1.0"]
# USER_TINY's two batches of one head-only epoch, val and test on two batches each.
ONE_EPOCH = ["trainer.max_epochs=1", "finetune.unfreeze_at_epoch=null", "+trainer.limit_val_batches=2"]
ONE_EPOCH += ["+trainer.limit_test_batches=2"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A bright, textured picture (hairs are dark on it) at the cache's size."""
    rng = np.random.default_rng(0)
    return rng.integers(150, 230, (PRE.resize_size, PRE.resize_size, 3), dtype=np.uint8)


@pytest.mark.parametrize("setting", list(NEW))
def test_each_new_augmentation_changes_the_image_and_keeps_uint8_hwc(photo: np.ndarray, setting: str) -> None:
    plain = train_transform(PRE, {})(image=photo)["image"]
    augmented = train_transform(PRE, {setting: NEW[setting]})
    augmented.set_random_seed(0)
    views = [augmented(image=photo)["image"] for _ in range(8)]
    assert all(v.dtype == np.uint8 and v.shape == (32, 32, 3) for v in views)
    changed = [not np.array_equal(v, plain) for v in views]
    assert sum(changed) >= 6, changed  # RandAugment may draw its identity op now and then
    assert len({v.tobytes() for v in views}) >= 6  # each draw its own
    if setting == "hair":  # thin dark curves: a few pixels, all darker
        hair = views[0].astype(int) - plain
        assert (hair <= 0).all() and 0 < (hair < 0).any(axis=2).mean() < 0.4


@pytest.mark.parametrize("workers", [0, 2])
def test_the_new_augmentations_follow_the_loader_seed(photo: np.ndarray, workers: int) -> None:
    cache = np.repeat(photo[None], 6, axis=0)  # six copies of the same picture

    def images(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        dataset = LesionDataset([""] * 6, [0] * 6, range(6), train_transform(PRE, ALL_NEW), cache, range(6))
        return [b["image"][0] for b in DataLoader(dataset, batch_size=1, num_workers=workers)]

    first = images(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(first, images(seed=0), strict=True))
    assert len({t.numpy().tobytes() for t in first}) == 6  # each item (and worker) draws its own
    assert not all(torch.equal(a, b) for a, b in zip(first, images(seed=1), strict=True))


def test_randaugment_and_trivial_augment_together_and_out_of_range_values_are_refused(tmp_path: Path) -> None:
    run = [f"paths.output_dir={tmp_path / 'run'}"]
    for overrides, message in (
        (["+data.augment.randaugment=9", "+data.augment.trivial_augment=true"], "alternatives"),
        (["+data.augment.erase=1.5"], "data.augment.erase=1.5 is not allowed"),
        (["+data.augment.mixup=-1"], "data.augment.mixup=-1 is not allowed"),
        (["module.colour_constancy=0"], "module.colour_constancy=0 is not valid"),
    ):
        with pytest.raises(SettingError, match=message):
            check_settings(compose_config("train", run + overrides), TrainSettings)
    assert not (tmp_path / "run").exists()


def test_mixup_and_cutmix_give_targets_that_sum_to_one_and_leave_an_odd_last_image_alone() -> None:
    assert BatchMixer.from_spec(AugmentSpec.from_config({}), 7) is None
    mixer = BatchMixer.from_spec(AugmentSpec.from_config({"mixup": 0.4, "cutmix": 1.0}), 7)
    np.random.seed(0)  # timm draws from numpy (seeded by seed_everything in training)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    seen = set()
    for _ in range(6):
        images = torch.randn(7, 3, 8, 8)
        original = images.clone()
        mixed, targets = mixer(images, labels)
        assert targets.shape == (7, 7) and torch.allclose(targets.sum(dim=1), torch.ones(7))
        assert torch.equal(targets[6], F.one_hot(labels[6], 7).float()) and torch.equal(mixed[6], original[6])
        lam = targets[0, 0].item()  # image 0 is mixed with image 5 (the batch mirrored)
        assert targets[0, 5].item() == pytest.approx(1 - lam) and lam >= 0
        cut = (mixed[0] == original[5]).all(dim=0) & (mixed[0] != original[0]).all(dim=0)
        seen.add("cutmix" if cut.any() else "mixup")
        if not cut.any():
            torch.testing.assert_close(mixed[:6], lam * original[:6] + (1 - lam) * original[:6].flip(0))
    assert seen == {"cutmix", "mixup"}  # switch_prob 0.5: both kinds are drawn


LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
SOFT = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
WEIGHT = torch.tensor([1.0, 2.0, 0.5])


def _by_hand(gamma: float | None, smoothing: float) -> float:
    """The soft loss written out: per image and class, the (weighted) loss the image would have with that
    label, mixed by the target; divided by the target's mixed class weights. ``gamma`` None: cross-entropy,
    whose smoothing term weighs each class by its own weight (as torch's with integer labels); else focal,
    whose whole term takes the label's weight (as FocalLoss with integer labels)."""
    w = WEIGHT.tolist()
    numerator = denominator = 0.0
    for logits, target in zip(LOGITS.tolist(), SOFT.tolist(), strict=True):
        norm = math.log(sum(math.exp(z) for z in logits))
        nll = [norm - z for z in logits]
        for c, t in enumerate(target):
            if gamma is None:
                term = (1 - smoothing) * w[c] * nll[c] + smoothing / 3 * sum(wk * n for wk, n in zip(w, nll))
            else:
                focus = (1 - math.exp(-nll[c])) ** gamma
                term = w[c] * focus * ((1 - smoothing) * nll[c] + smoothing * sum(nll) / 3)
            numerator += t * term
            denominator += t * w[c]
    return numerator / denominator


def test_soft_targets_with_class_weights_give_the_hand_computed_loss() -> None:
    assert CrossEntropy()(LOGITS, SOFT, WEIGHT).item() == pytest.approx(_by_hand(None, 0.0), rel=1e-6)
    assert CrossEntropy(0.1)(LOGITS, SOFT, WEIGHT).item() == pytest.approx(_by_hand(None, 0.1), rel=1e-6)
    assert FocalLoss(2.0)(LOGITS, SOFT, WEIGHT).item() == pytest.approx(_by_hand(2.0, 0.0), rel=1e-6)
    assert FocalLoss(2.0, 0.1)(LOGITS, SOFT, WEIGHT).item() == pytest.approx(_by_hand(2.0, 0.1), rel=1e-6)
    # Not torch's own soft-target mean (which divides by the batch size, not by the class weights).
    assert CrossEntropy()(LOGITS, SOFT, WEIGHT).item() != pytest.approx(F.cross_entropy(LOGITS, SOFT, WEIGHT).item())


@pytest.mark.parametrize("loss", [CrossEntropy(0.1), FocalLoss(2.0, 0.1), FocalLoss(0.0)], ids=repr)
@pytest.mark.parametrize("weighted", [True, False])
def test_a_one_hot_target_gives_the_integer_labels_loss(loss: torch.nn.Module, weighted: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 7, generator=generator) * 3, torch.arange(16) % 7
    weight = torch.linspace(0.2, 3.0, 7) if weighted else None
    hard = loss(logits, labels, weight)
    assert loss(logits, F.one_hot(labels, 7).float(), weight).item() == pytest.approx(hard.item(), rel=1e-5)


def test_training_with_every_new_augmentation_and_colour_constancy(tmp_path: Path) -> None:
    """Odd batches (15) meet mixup, the focal loss reads soft targets with balanced class weights. A probe
    callback (tests/training_probe.py) records that the command's module mixed its training batches and that
    its loader's transform is not the recipe without the new augmentations."""
    shutil.copy(Path(__file__).with_name("training_probe.py"), tmp_path)
    probe = [
        "+callbacks.probe._target_=training_probe.WiringProbe",
        f"+callbacks.probe.output={tmp_path / 'probe.json'}",
    ]
    options = [*ALL_NEW_CLI, *MIX_CLI, "module.colour_constancy=6", "loss=focal", "data.batch_size=15", *ONE_EPOCH]
    result = run_user(tmp_path, "python", "-m", "skinlesion.train", *USER_TINY, *options, *probe)
    assert result.returncode == 0, result.stderr[-3000:]
    wiring = json.loads((tmp_path / "probe.json").read_text())
    assert wiring["mixer"] == [0.4, 1.0]  # the module built timm's Mixup from data.augment
    assert wiring["mixed_batches"] == 2 and wiring["soft_target_batches"] >= 1  # and it mixed in training
    assert all(wiring["loader_differs_from_base"])  # hair, RandAugment and erasing are in the training loader
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1
    assert math.isfinite(metrics["last_epoch"]["train/loss"])
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["hyper_parameters"]["preprocessing"]["colour_constancy"] == 6.0
    augment = best["datamodule_hyper_parameters"]["augment"]
    assert {key: augment[key] for key in [*ALL_NEW, "mixup", "cutmix"]} == ALL_NEW | {"mixup": 0.4, "cutmix": 1.0}


@pytest.mark.slow
def test_a_run_with_the_new_options_resumes_and_refuses_switching_them_off(tmp_path: Path) -> None:
    options = [*ALL_NEW_CLI, *MIX_CLI, "module.colour_constancy=6", *ONE_EPOCH]
    assert run_user(tmp_path, "python", "-m", "skinlesion.train", *USER_TINY, *options).returncode == 0
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    off = "module.colour_constancy=null"
    refused = run_user(tmp_path, "python", "-m", "skinlesion.train", f"ckpt_path={last}", off)
    assert refused.returncode == 2 and "module.colour_constancy: 6 -> None" in refused.stderr
    resumed = run_user(tmp_path, "python", "-m", "skinlesion.train", f"ckpt_path={last}", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
