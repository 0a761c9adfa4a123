"""The metrics every split reports, under ``split/name`` keys.

Balanced accuracy (mean per-class recall) is the ISIC 2018 Task 3 metric and the default checkpoint
criterion: on HAM10000 predicting ``nv`` for everything already scores 67% plain accuracy. It averages
over the classes that have true images in the evaluated set, as ``sklearn.metrics.balanced_accuracy_score``
does; torchmetrics' macro recall also averages a class that is only predicted, as recall 0. Macro F1 keeps
torchmetrics' definition, which is scikit-learn's too: a class counts when it is true or predicted. Macro
AUROC, likewise, averages the classes with true images (a class absent from an external set has none).
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
    MulticlassStatScores,
)
from torchmetrics.utilities.data import dim_zero_cat

from skinlesion.labels import CLASSES

HEADLINE_METRICS = ("acc", "top3_acc", "balanced_acc", "f1_macro", "auroc_macro")


class MulticlassBalancedAccuracy(MulticlassStatScores):
    """Mean recall over the classes with at least one true image (scikit-learn's balanced accuracy)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(num_classes, average=None, **kwargs)

    def compute(self) -> torch.Tensor:
        tp, _, _, fn = self._final_state()
        support = tp + fn
        present = support > 0
        return (tp[present] / support[present]).float().mean()


class MulticlassPresentAUROC(MulticlassAUROC):
    """One-vs-rest AUROC averaged over the classes with at least one true image (scikit-learn's ``ovr`` macro on
    the classes present); torchmetrics' macro average scores a class absent from the set as 0."""

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(num_classes, average=None, **kwargs)

    def compute(self) -> torch.Tensor:
        per_class = super().compute()
        present = torch.bincount(dim_zero_cat(self.target).long(), minlength=self.num_classes) > 0
        return per_class[present].mean()


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
        "balanced_acc": MulticlassBalancedAccuracy(n, **checks),
    }
    if full:
        metrics |= {
            "top3_acc": MulticlassAccuracy(n, top_k=min(3, n), average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
            "auroc_macro": MulticlassPresentAUROC(n),
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
