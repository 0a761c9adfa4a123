"""ECE matches its formula, temperature scaling never worsens validation NLL, diagrams are drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from skinlesion.inference.predictions import SplitPredictions
from skinlesion.scoring.calibration import (
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    write_calibration,
)

K = 4  # classes in the hand-made examples


def probs_with_confidence(confidences: list[float], predicted: list[int]) -> torch.Tensor:
    """Rows whose top class is ``predicted`` with probability ``confidence``, the rest spread evenly."""
    rows = torch.empty(len(confidences), K)
    for i, (c, k) in enumerate(zip(confidences, predicted, strict=True)):
        rows[i] = (1 - c) / (K - 1)
        rows[i, k] = c
    return rows


def test_ece_matches_the_formula_worked_by_hand() -> None:
    # 5 bins of width 0.2. Bin [0.2, 0.4): confidences 0.30 (right), 0.35 (wrong) -> accuracy 0.5,
    # confidence 0.325, gap 0.175. Bin [0.8, 1.0): 0.90 (right), 0.90 (right), 0.95 (wrong), 0.85 (right)
    # -> accuracy 0.75, confidence 0.90, gap 0.15. ECE = 2/6 * 0.175 + 4/6 * 0.15 = 0.158333...
    confidences = [0.30, 0.35, 0.90, 0.90, 0.95, 0.85]
    predicted = [0, 1, 2, 3, 0, 1]
    labels = torch.tensor([0, 2, 2, 3, 1, 1])
    probs = probs_with_confidence(confidences, predicted)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(2 / 6 * 0.175 + 4 / 6 * 0.15, abs=1e-6)

    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins["count"].tolist() == [0, 2, 0, 0, 4]
    assert bins["accuracy"][1] == pytest.approx(0.5) and bins["accuracy"][4] == pytest.approx(0.75)
    assert bins["confidence"][1] == pytest.approx(0.325) and bins["confidence"][4] == pytest.approx(0.9)


def test_a_saturated_confidence_of_one_is_binned_like_the_diagram_draws_it() -> None:
    # Confidences 1.0 (wrong) and 0.95 (right) share the last of 5 bins: accuracy 0.5, confidence 0.975.
    probs = probs_with_confidence([1.0, 0.95], [0, 1])
    labels = torch.tensor([1, 1])
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.475, abs=1e-6)
    assert reliability_bins(probs, labels, n_bins=5)["count"].tolist() == [0, 0, 0, 0, 2]


def test_ece_is_zero_when_confidence_equals_accuracy() -> None:
    # Ten predictions at confidence 0.8, eight of them right: perfectly calibrated.
    probs = probs_with_confidence([0.8] * 10, [0] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)


def synthetic_logits(n: int, scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(base), logits = scale * base: scale > 1 is over-, < 1 under-confident."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 7, generator=generator) * 2
    labels = torch.multinomial(base.softmax(1), 1, generator=generator).squeeze(1)
    return base * scale, labels


@pytest.mark.parametrize(("scale", "expected"), [(3.0, 3.0), (0.5, 0.5), (1.0, 1.0)])
def test_temperature_scaling_lowers_or_keeps_validation_nll(scale: float, expected: float) -> None:
    logits, labels = synthetic_logits(4000, scale)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(expected, rel=0.15)  # recovers the distortion
    before, after = F.cross_entropy(logits, labels), F.cross_entropy(logits / temperature, labels)
    assert after <= before + 1e-6
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))  # predictions unchanged
    metrics = calibration_metrics(logits, labels, temperature, "val")
    assert metrics["val/nll"] <= metrics["val/nll_uncalibrated"] + 1e-6
    if scale != 1.0:
        assert metrics["val/ece"] < metrics["val/ece_uncalibrated"]


def test_temperature_never_makes_nll_worse_on_degenerate_outputs() -> None:
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0]])  # one wrong, one right: sharpening only adds loss
    labels = torch.tensor([0, 1])
    temperature = fit_temperature(logits, labels)
    assert F.cross_entropy(logits / temperature, labels) <= F.cross_entropy(logits, labels)


def test_a_validation_split_the_model_gets_all_right_keeps_temperature_one(caplog) -> None:
    """NLL falls without limit as T -> 0 there; a temperature near 0 would make the next split's probabilities
    0 or 1."""
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    with caplog.at_level("WARNING"):
        assert fit_temperature(logits, labels) == 1.0
    assert "cannot calibrate it; keeping T=1" in caplog.text


def test_write_calibration_draws_the_diagram_and_reports_both_sides(tmp_path: Path) -> None:
    logits, labels = synthetic_logits(500, 3.0)
    predictions = SplitPredictions.from_logits(logits, labels, torch.arange(len(labels)))
    metrics = write_calibration(tmp_path, "test", predictions, temperature=3.0)
    assert (tmp_path / "reliability_test.png").stat().st_size > 0
    assert set(metrics) == {"test/ece", "test/ece_uncalibrated", "test/nll", "test/nll_uncalibrated"}
    assert metrics["test/nll"] < metrics["test/nll_uncalibrated"]
