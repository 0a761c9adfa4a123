"""Test-time views: ordered crops of an enlarged image at several scales, each in every flip/rotation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skinlesion.errors import ConfigError
from skinlesion.inference.tta import ViewPlan, crop_offsets, predict_proba_tta, view_plan
from skinlesion.runfolder.checkpoints import load_classifier

from conftest import random_checkpoint, run_cli

TL, TR, BL, BR = 0, 80, 160, 240  # the quadrants' values in the synthetic image


def quadrants(size: int = 8) -> torch.Tensor:
    """A 1x3xSxS uint8 image whose four quadrants are flat: which quadrant a crop holds is readable."""
    half = size // 2
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    image[..., :half, half:], image[..., half:, :half], image[..., half:, half:] = TR, BL, BR
    return image


def test_crop_grids_are_ordered_corners_then_centre_or_row_by_row() -> None:
    assert crop_offsets(10, 8, 5) == [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    assert crop_offsets(12, 8, 9) == [(0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4), (4, 0), (4, 2), (4, 4)]
    assert crop_offsets(12, 8, 1) == [(2, 2)]  # one crop: the centre
    with pytest.raises(ValueError, match="square"):
        crop_offsets(12, 8, 3)


def test_views_come_scale_by_scale_crop_by_crop_each_in_every_flip() -> None:
    image = quadrants()
    plan = ViewPlan(flips=2, crops=5, scales=(1.0, 2.0))
    views = list(plan.views(image))
    assert plan.count == len(views) == 2 * (1 + 5)
    assert all(v.shape == image.shape and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], image) and torch.equal(views[1], image.flip(3))  # scale 1: the image itself
    # Scale 2, unflipped: the corner crops are the quadrants enlarged (their outer corners untouched by the
    # interpolation, their means nearest their own quadrant's value), in the order TL, TR, BL, BR.
    corners = views[2:10:2]
    outer = [corners[0][0, 0, 0, 0], corners[1][0, 0, 0, -1], corners[2][0, 0, -1, 0], corners[3][0, 0, -1, -1]]
    assert [int(v) for v in outer] == [TL, TR, BL, BR]
    values = torch.tensor([TL, TR, BL, BR], dtype=torch.float)
    assert [int((values - c.float().mean()).abs().argmin()) for c in corners] == [0, 1, 2, 3]
    centre = views[10]  # the centre crop straddles all four quadrants
    assert [int(centre[0, 0, i, j]) for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1))] == [TL, TR, BL, BR]
    assert torch.equal(views[3], views[2].flip(3))  # every crop also flipped, right after it


def test_settings_give_the_plan_or_one_clear_error() -> None:
    assert view_plan(False, 8) == ViewPlan()  # the default: each image once
    assert view_plan(False, 8, 5, [1.0, 1.25]).count == 6  # crops without flips
    assert view_plan(True, 8, 9, [1.25, 1.5]).count == 8 * 18
    assert view_plan(True, 4, 1, [1.0]).count == 4
    with pytest.raises(ConfigError, match="tta_crops=5 crops an enlarged image"):
        view_plan(True, 8, 5, [1.0])
    with pytest.raises(ConfigError, match="tta_crops=3"):
        view_plan(False, 8, 3, [1.25])
    for scales in ([0.5], [1.25, 1.25], []):
        with pytest.raises(ConfigError, match="tta_scales"):
            view_plan(False, 8, 5, scales)


def test_crop_tta_on_a_model_is_deterministic_and_gives_probabilities(tmp_path: Path) -> None:
    model = load_classifier(random_checkpoint(tmp_path / "best.ckpt", "mobilenetv2", 32, head_std=0.5))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plan = ViewPlan(crops=5, scales=(1.25,))
    probs = predict_proba_tta(model, images, plan)
    assert probs.shape == (4, len(model.class_names))
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5) and (probs >= 0).all()
    assert torch.equal(probs, predict_proba_tta(model, images, plan))
    with torch.no_grad():
        single = model.predict_proba(images)
    assert torch.equal(predict_proba_tta(model, images, ViewPlan()), single)  # one view: no averaging at all
    assert not torch.allclose(probs, single, atol=1e-4)  # the crops changed what was averaged


@pytest.mark.slow  # the README test runs an evaluate with crops and scales
def test_evaluate_command_with_crops_and_scales_records_its_views(trained_run: Path, tmp_path: Path) -> None:
    checkpoint = trained_run / "checkpoints" / "best.ckpt"
    args = [f"ckpt_path={checkpoint}", "tta=true", "tta_views=2", "tta_crops=5", "tta_scales=[1.0,1.25]"]
    result = run_cli(tmp_path, "skinlesion.evaluate", *args, "clinical.figures=false", "device=cpu", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics,) = (tmp_path / "outputs" / "evaluate" / "runs").glob("*/metrics.json")
    saved = json.loads(metrics.read_text())
    assert saved["tta"] == {"views": 12, "flips": 2, "crops": 5, "scales": [1.0, 1.25]}
    assert saved["tta_views"] == 12 and 0 <= saved["metrics"]["test/balanced_acc"] <= 1
