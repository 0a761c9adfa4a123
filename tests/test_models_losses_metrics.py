"""The losses (class weights, label smoothing, focal) and the split/metric definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score, top_k_accuracy_score

from skinlesion.labels import CLASSES
from skinlesion.models.losses import CrossEntropy, FocalLoss
from skinlesion.models.metrics import classification_metrics


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=generator) * 3
    target = torch.arange(64) % 7
    weight = torch.linspace(0.2, 3.0, 7)
    return logits, target, weight


def test_cross_entropy_uses_class_weights_and_label_smoothing(batch) -> None:
    logits, target, weight = batch
    expected = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)
    assert CrossEntropy(label_smoothing=0.1)(logits, target, weight) == pytest.approx(expected.item())
    assert CrossEntropy()(logits, target) == pytest.approx(F.cross_entropy(logits, target).item())


def test_focal_loss_with_gamma_zero_is_cross_entropy(batch) -> None:
    logits, target, weight = batch
    assert FocalLoss(gamma=0.0)(logits, target, weight) == pytest.approx(
        F.cross_entropy(logits, target, weight=weight).item(), rel=1e-5
    )
    assert FocalLoss(gamma=0.0, label_smoothing=0.1)(logits, target) == pytest.approx(
        F.cross_entropy(logits, target, label_smoothing=0.1).item(), rel=1e-5
    )


def test_focal_loss_down_weights_easy_examples() -> None:
    target = torch.tensor([0, 0])
    easy, hard = torch.tensor([[6.0] + [0.0] * 6]), torch.tensor([[0.0] * 6 + [6.0]])
    ce = CrossEntropy()
    focal = FocalLoss(gamma=2.0)
    ratio_easy = focal(easy, target[:1]) / ce(easy, target[:1])
    ratio_hard = focal(hard, target[:1]) / ce(hard, target[:1])
    assert ratio_easy < 0.01 and ratio_hard > 0.9


def test_metric_names_and_values_match_scikit_learn(batch) -> None:
    logits, target, _ = batch
    probs = logits.softmax(1)
    metrics = classification_metrics("val")
    metrics.update(probs, target)
    values = {k: float(v) for k, v in metrics.compute().items()}
    expected_names = {f"val/{n}" for n in ("acc", "top3_acc", "balanced_acc", "f1_macro", "auroc_macro")}
    expected_names |= {f"val/{kind}_{c}" for kind in ("recall", "precision") for c in CLASSES}
    assert set(values) == expected_names
    pred = probs.argmax(1).numpy()
    y = target.numpy()
    assert values["val/acc"] == pytest.approx((pred == y).mean(), abs=1e-6)
    assert values["val/balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-6)
    assert values["val/f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-6)
    assert values["val/top3_acc"] == pytest.approx(top_k_accuracy_score(y, probs.numpy(), k=3), abs=1e-6)
    assert values["val/auroc_macro"] == pytest.approx(roc_auc_score(y, probs.numpy(), multi_class="ovr"), abs=1e-4)
    recalls = [values[f"val/recall_{c}"] for c in CLASSES]
    assert values["val/balanced_acc"] == pytest.approx(sum(recalls) / len(recalls), abs=1e-6)


# Classes 3-6 have no true image; class 4 is predicted anyway. Recall 3/4, 2/3 and 1/3 over the classes
# present: balanced accuracy 7/12 (scikit-learn, ISIC), not 7/16 (torchmetrics' macro recall counts class 4).
ABSENT_CLASS_LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
ABSENT_CLASS_PREDS = torch.tensor([0, 0, 0, 4, 1, 1, 4, 2, 0, 4])


@pytest.mark.parametrize("full", [True, False])
def test_balanced_accuracy_averages_the_classes_with_true_images_like_scikit_learn(full: bool) -> None:
    probs = F.one_hot(ABSENT_CLASS_PREDS, len(CLASSES)).float() * 0.9 + 0.1 / len(CLASSES)
    metrics = classification_metrics("test", full=full)
    metrics.update(probs, ABSENT_CLASS_LABELS)
    value = float(metrics.compute()["test/balanced_acc"])
    assert value == pytest.approx(balanced_accuracy_score(ABSENT_CLASS_LABELS, ABSENT_CLASS_PREDS), abs=1e-6)
    assert value == pytest.approx(7 / 12, abs=1e-6)


def test_macro_auroc_averages_the_classes_with_true_images_like_scikit_learn() -> None:
    """An external set without, say, dermatofibromas has no AUROC for df; counting it as 0 (torchmetrics' macro
    average) would report a model as worse than it is."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(60) % 4  # classes 4-6 have no true image
    probs = (torch.randn(60, len(CLASSES), generator=generator) + 2 * F.one_hot(labels, len(CLASSES))).softmax(1)
    metrics = classification_metrics("test")
    metrics.update(probs, labels)
    value = float(metrics.compute()["test/auroc_macro"])
    present = [
        roc_auc_score((labels == k).numpy(), probs[:, k].numpy()) for k in range(4)
    ]  # one-vs-rest over the classes present
    assert value == pytest.approx(sum(present) / len(present), abs=1e-4)
