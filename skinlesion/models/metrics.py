"""The metrics every split reports, under ``split/name`` keys.

Balanced accuracy (mean per-class recall) is the ISIC 2018 Task 3 metric and the default checkpoint
criterion: on HAM10000 predicting ``nv`` for everything already scores 67% plain accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import ClasswiseWrapper, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from skinlesion.labels import CLASSES

HEADLINE_METRICS = ("acc", "top3_acc", "balanced_acc", "f1_macro", "auroc_macro")


def classification_metrics(split: str, classes=CLASSES, full: bool = True) -> MetricCollection:
    """Metrics fed with probabilities; ``full=False`` keeps the cheap top-1 ones (for the training split,
    which feeds logits: their argmax is the probabilities').

    The training metrics skip torchmetrics' input checks, which read values back from the GPU and so
    would stall every training step; evaluation keeps them.
    """
    n = len(classes)
    checks = {"validate_args": full}
    metrics = {
        "acc": MulticlassAccuracy(n, average="micro", **checks),
        "balanced_acc": MulticlassRecall(n, average="macro", **checks),
    }
    if full:
        metrics |= {
            "top3_acc": MulticlassAccuracy(n, top_k=min(3, n), average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
            "auroc_macro": MulticlassAUROC(n, average="macro"),
            "recall": ClasswiseWrapper(MulticlassRecall(n, average=None), labels=list(classes), prefix="recall_"),
            "precision": ClasswiseWrapper(
                MulticlassPrecision(n, average=None), labels=list(classes), prefix="precision_"
            ),
        }
    return MetricCollection(metrics, prefix=f"{split}/", compute_groups=False)


def _not_distributed() -> bool:
    return False


def probability_metrics(probs: torch.Tensor, labels: torch.Tensor, split: str, classes: Sequence[str]) -> dict:
    """``split/name`` metrics of probabilities against labels, plus ``split/nll``."""
    metrics = classification_metrics(split, classes)
    for metric in metrics.modules():  # the tensors already hold the whole split: no sync with other DDP ranks
        if isinstance(metric, Metric):
            metric.distributed_available_fn = _not_distributed
    metrics.update(probs, labels)
    values = {k: float(v) for k, v in metrics.compute().items()}
    picked = probs.gather(1, labels[:, None]).clamp_min(1e-12)
    values[f"{split}/nll"] = float(-picked.log().mean())
    return values
