"""Shades of Gray colour constancy: what it does to an image, and that every command applies the same one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from skinlesion.data.colour_constancy import shades_of_gray
from skinlesion.data.preprocessing import Preprocessing
from skinlesion.errors import ConfigError
from skinlesion.export import export
from skinlesion.inference.model import InferenceModel
from skinlesion.inference.tta import predict_proba_tta

from conftest import compose_config, random_checkpoint

SIZE = 32


def lesion_photo(cast: tuple[float, float, float] = (1.0, 1.0, 1.0), batch: int = 1) -> torch.Tensor:
    """uint8 NCHW: a neutral textured skin-and-lesion picture seen under a light of colour ``cast``."""
    generator = torch.Generator().manual_seed(0)
    grey = 60 + 120 * torch.rand(batch, 1, SIZE, SIZE, generator=generator)
    tint = torch.tensor([1.0, 0.85, 0.8]).view(1, 3, 1, 1)  # skin is not grey, but the light should not matter
    return (grey * tint * torch.tensor(cast).view(1, 3, 1, 1)).clamp(0, 255).round().to(torch.uint8)


def illuminant(pixels: torch.Tensor, power: float = 6) -> torch.Tensor:
    return pixels.float().pow(power).mean(dim=(2, 3)).pow(1 / power)


def test_a_colour_cast_is_neutralised_and_a_grey_light_keeps_the_image() -> None:
    plain, cast = lesion_photo(), lesion_photo(cast=(1.25, 1.0, 0.6))
    corrected = shades_of_gray(cast.float(), 6)
    estimate = illuminant(corrected)[0]
    assert estimate.max() / estimate.min() == pytest.approx(1.0, abs=0.01)  # the light is now grey
    assert illuminant(cast)[0].max() / illuminant(cast)[0].min() > 1.8  # it was far from it
    # The same photo under two lights comes out the same, up to its brightness (the light's length is kept).
    neutral = shades_of_gray(plain.float(), 6)
    torch.testing.assert_close(corrected / corrected.mean(), neutral / neutral.mean(), atol=0.02, rtol=0.02)
    assert not torch.allclose(cast.float() / cast.float().mean(), neutral / neutral.mean(), atol=0.1)
    grey = torch.full((1, 3, 8, 8), 100.0)
    torch.testing.assert_close(shades_of_gray(grey, 6), grey)
    yellowish = torch.tensor([200.0, 200.0, 20.0]).view(1, 3, 1, 1).repeat(1, 1, 64, 64)
    yellowish[0, :, 0, 0] = torch.tensor([0.0, 0.0, 250.0])  # one blue pixel: its gain takes it past 255
    assert shades_of_gray(yellowish, 6)[0, :, 0, 0].tolist() == [0, 0, 255]
    assert torch.equal(shades_of_gray(torch.zeros(1, 3, 4, 4), 6), torch.zeros(1, 3, 4, 4))  # no NaN on black


@pytest.mark.parametrize("power", [0.5, float("inf"), "6", True])
def test_a_power_that_is_not_a_number_of_at_least_one_is_refused(power) -> None:
    with pytest.raises(ConfigError, match="colour_constancy"):
        Preprocessing(32, (0.5,) * 3, (0.5,) * 3, colour_constancy=power)


def _with_colour_constancy(path: Path, power: float | None) -> Path:
    """A random checkpoint whose preprocessing has ``power`` (None: written before the setting existed)."""
    checkpoint = torch.load(path, weights_only=False)
    pre = checkpoint["hyper_parameters"]["preprocessing"]
    if power is None:
        del pre["colour_constancy"]
    else:
        pre["colour_constancy"] = power
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("colour")
    plain = random_checkpoint(root / "old.ckpt", "mobilenetv2", SIZE)
    shades = random_checkpoint(root / "shades.ckpt", "mobilenetv2", SIZE)
    return {"old": _with_colour_constancy(plain, None), "shades": _with_colour_constancy(shades, 6.0)}


def test_training_evaluation_predict_tta_and_explain_share_one_correction(checkpoints: dict[str, Path]) -> None:
    loaded = InferenceModel.load(checkpoints["shades"], "cpu")
    model = loaded.model
    assert model.preprocessing.colour_constancy == 6.0 and model.hparams.preprocessing["colour_constancy"] == 6.0
    images = lesion_photo(cast=(1.2, 1.0, 0.7), batch=3)
    by_hand = (shades_of_gray(images.float(), 6) - model.mean) / model.std
    expected = model.backbone(by_hand)
    batch = model.on_after_batch_transfer({"image": images.clone()}, 0)  # training, validation and test batches
    torch.testing.assert_close(batch["image"], by_hand)
    torch.testing.assert_close(loaded.logits(images), expected)  # predict's OOD scores; explain's normalize
    probs = torch.softmax(expected / model.temperature, dim=1)
    torch.testing.assert_close(loaded.predict_proba(images), probs)  # predict
    flips = predict_proba_tta(model, images, views=2)  # the correction does not depend on orientation
    torch.testing.assert_close(flips, (probs + model.predict_proba(images.flip(3))) / 2)
    plain = model.backbone((images.float() - model.mean) / model.std)
    assert (expected - plain).abs().max() > 1e-3  # the correction reached the logits


def test_a_checkpoint_from_before_colour_constancy_loads_with_it_off(checkpoints: dict[str, Path]) -> None:
    loaded = InferenceModel.load(checkpoints["old"], "cpu")
    assert loaded.model.preprocessing.colour_constancy is None
    images = lesion_photo(cast=(1.2, 1.0, 0.7), batch=2)
    model = loaded.model
    torch.testing.assert_close(loaded.logits(images), model.backbone((images.float() - model.mean) / model.std))


# torch.export (the default exporter) takes half a minute on two cores: the default suite traces instead.
@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"])
def test_the_onnx_graph_applies_the_correction_behind_the_usual_input(
    tmp_path: Path, checkpoints: dict[str, Path], exporter: str
) -> None:
    run = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"exporter={exporter}"]
    result = export(compose_config("export", [*run, f"ckpt_path={checkpoints['shades']}"]))
    loaded = InferenceModel.load(checkpoints["shades"], "cpu")
    model = loaded.model
    images = lesion_photo(cast=(0.7, 1.0, 1.3), batch=5)  # a batch size the parity check did not use
    inputs = ((images.float() - model.mean) / model.std).numpy()  # as the JSON says: no correction by the user
    session = onnxruntime.InferenceSession(result["onnx"], providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": inputs})[0], loaded.logits(images).numpy(), atol=1e-4)
