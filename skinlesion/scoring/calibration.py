"""Calibrated probabilities: expected calibration error, temperature scaling, reliability diagrams.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar fitted on the validation split
by minimising the negative log-likelihood; it changes confidences, never the predicted class. The
temperature is stored in the checkpoint (buffer ``temperature``) and applied by
``SkinLesionClassifier.predict_proba(..., calibrated=True)``, so `predict` and `evaluate` use it unless
told ``calibrated=false``.

ECE is the top-label L1 calibration error over ``n_bins`` equal-width confidence bins,
``sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)|``, computed from the same bins the reliability
diagram draws (torchmetrics' version puts a confidence of exactly 1.0 in a bin of its own, so its value
and the diagram's points would disagree for saturated predictions).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skinlesion.inference.predictions import SplitPredictions, probabilities
from skinlesion.plots import plt, save_figure

log = logging.getLogger(__name__)

N_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    weights = bins["count"][filled] / bins["count"].sum()
    return float(np.sum(weights * np.abs(bins["accuracy"][filled] - bins["confidence"][filled])))


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature T in ``bounds`` minimising NLL(softmax(logits / T)) on these (validation) outputs."""
    logits, labels = logits.detach().float().clone(), labels.detach().clone()  # may be inference tensors
    if bool((logits.argmax(1) == labels).all()):
        # Every prediction right: NLL falls without limit as T -> 0, so the split supports no finite
        # temperature, and one at the search's bound makes the next split's probabilities 0 or 1 (the demo's
        # test NLL rose from 0.22 to 0.58 that way).
        log.warning(
            "temperature scaling: the model gets every validation image right, so that split cannot calibrate it; "
            "keeping T=1 (calibrate on a larger or harder validation split)"
        )
        return 1.0
    log_t = torch.zeros((), requires_grad=True)  # optimise log T so that T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp().clamp(*bounds))
    before = F.cross_entropy(logits, labels)
    after = F.cross_entropy(logits / temperature, labels)
    return temperature if after <= before else 1.0  # never make NLL worse than no scaling


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float, split: str) -> dict:
    """ECE and NLL of one split without (``*_uncalibrated``) and with the temperature."""
    logits = logits.float()
    return {
        f"{split}/ece_uncalibrated": expected_calibration_error(probabilities(logits), labels),
        f"{split}/ece": expected_calibration_error(probabilities(logits, temperature), labels),
        f"{split}/nll_uncalibrated": float(F.cross_entropy(logits, labels)),
        f"{split}/nll": float(F.cross_entropy(logits / temperature, labels)),
    }


def write_calibration(out_dir: Path, split: str, predictions: SplitPredictions, temperature: float) -> dict:
    """``reliability_<split>.png`` (before and after scaling) and the split's calibration metrics, from the
    predictions' logits."""
    logits, labels = predictions.logits, predictions.labels
    curves = {
        "uncalibrated": (probabilities(logits), labels),
        f"temperature {temperature:.2f}": (probabilities(logits, temperature), labels),
    }
    plot_reliability(curves, out_dir / f"reliability_{split}.png", title=f"{split} (n={len(labels)})")
    return calibration_metrics(logits, labels, temperature, split)


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count, binned like the ECE ([low, high); 1.0 in the last bin)."""
    confidence, predicted = probs.float().max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins).scatter_add_(0, index, torch.ones_like(confidence))
    total_conf = torch.zeros(n_bins).scatter_add_(0, index, confidence)
    total_correct = torch.zeros(n_bins).scatter_add_(0, index, correct)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": edges.numpy(),
            "count": count.numpy(),
            "confidence": (total_conf / count).numpy(),
            "accuracy": (total_correct / count).numpy(),
        }


def plot_reliability(
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, n_bins: int = N_BINS, title: str = ""
) -> None:
    """Accuracy against mean confidence per bin for each named (probs, labels) pair, with each one's ECE;
    below, how many predictions fall in each confidence bin (an almost empty bin's accuracy means little)."""
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    width = 1.0 / n_bins
    for k, (name, (probs, labels)) in enumerate(curves.items()):
        bins = reliability_bins(probs, labels, n_bins)
        filled = bins["count"] > 0
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.plot(bins["confidence"][filled], bins["accuracy"][filled], marker="o", label=f"{name} (ECE {ece:.3f})")
        offset = (k - (len(curves) - 1) / 2) * width / len(curves)
        hist.bar(bins["edges"][:-1] + width / 2 + offset, bins["count"], width / len(curves), label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("confidence (top-class probability)")
    hist.set_ylabel("predictions")
    save_figure(fig, path)
