"""Calibrated probabilities: expected calibration error, temperature scaling, reliability diagrams.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar fitted on the validation split
by minimising the negative log-likelihood; it changes confidences, never the predicted class.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skinlesion.plots import plt, save_figure


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = torch.zeros(())
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature T in ``bounds`` minimising NLL(softmax(logits / T)) on these (validation) outputs."""
    logits, labels = logits.detach().float().clone(), labels.detach().clone()  # may be inference tensors
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


def plot_reliability(
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, n_bins: int = 15, title: str = ""
) -> None:
    """Accuracy against confidence per bin for each named (probs, labels) pair, with each one's ECE."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (probs, labels) in curves.items():
        confidence, predicted = probs.max(dim=1)
        correct = (predicted == labels).float().numpy()
        bins = np.clip(np.digitize(confidence.numpy(), edges[1:-1], right=True), 0, n_bins - 1)
        xs = [confidence.numpy()[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ys = [correct[bins == b].mean() for b in range(n_bins) if (bins == b).any()]
        ece = expected_calibration_error(probs, labels, n_bins)
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability diagram")
    ax.legend(loc="upper left")
    save_figure(fig, path)
