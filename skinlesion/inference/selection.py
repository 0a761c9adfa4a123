"""How an ensemble's members are combined: the plain mean, greedy selection, or a stacked logistic regression.

Greedy selection (Caruana et al. 2004) and stacking are fitted on the members' VALIDATION predictions
only and then applied unchanged to the scored split, so no test label can steer the choice. Greedy
selection adds, round after round, the member (repeats allowed) whose addition gives the averaged
probabilities the best validation score, and keeps the best prefix of that sequence: the members'
weights are how often each was picked in it, divided by its length. Stacking fits a multinomial
logistic regression on the members' standardised log-probabilities, with balanced class weights and its
regularisation chosen by cross-validation over the validation lesions (a lesion's photos stay in one
fold). Its probabilities are the regression's, fitted on balanced classes: they are no longer the
members' temperature-calibrated ones.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from skinlesion.inference.predictions import SplitPredictions

log = logging.getLogger(__name__)

MEAN, GREEDY, STACKING = "mean", "greedy", "stacking"
STACKING_CS = tuple(float(c) for c in np.logspace(-3, 3, 13))  # inverse regularisation strengths tried
STACKING_SCORING = "neg_log_loss"
SEED = 0  # the stacking folds' shuffle
LOG_FLOOR = 1e-12  # a probability of 0 would give an infinite log


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], LOG_FLOOR)).mean())


def _balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """As every report scores it: the mean recall of the classes with true images."""
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": those are not averaged in
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, probs.argmax(axis=1)))


def selection_score(probs: np.ndarray, labels: np.ndarray, metric: str) -> tuple[float, ...]:
    """Higher is better: (balanced accuracy, -NLL), NLL breaking ties; or (-NLL,)."""
    nll = _nll(probs, labels)
    return (-nll,) if metric == "nll" else (_balanced_accuracy(probs, labels), -nll)


@dataclass(frozen=True)
class WeightedMean:
    """The members' probabilities averaged with weights ``counts / sum(counts)`` (all 1: the plain mean)."""

    counts: dict[str, int]
    method: str = MEAN
    details: dict = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, float]:
        total = sum(self.counts.values())
        return {name: count / total for name, count in self.counts.items()}

    def combine(self, predictions: Mapping[str, SplitPredictions]) -> SplitPredictions:
        return SplitPredictions.average([predictions[n] for n in self.counts], list(self.counts.values()))

    def to_dict(self) -> dict:
        return {"method": self.method, "weights": self.weights, **self.details}


def greedy_selection(predictions: Mapping[str, SplitPredictions], rounds: int, metric: str) -> WeightedMean:
    """Forward selection with replacement: ``rounds`` picks, each the member that makes the running average
    score best (the first listed on a tie), and the prefix with the best score kept (the shortest on a tie)."""
    names = list(predictions)
    probs = np.stack([predictions[n].probs.double().numpy() for n in names])  # members x N x classes
    labels = next(iter(predictions.values())).labels.numpy()
    total, counts = np.zeros_like(probs[0]), np.zeros(len(names), dtype=int)
    best, best_counts, path = None, counts, []
    for size in range(1, rounds + 1):
        scores = [selection_score((total + p) / size, labels, metric) for p in probs]
        pick = max(range(len(names)), key=scores.__getitem__)
        total, counts = total + probs[pick], counts + np.eye(len(names), dtype=int)[pick]
        path.append({"added": names[pick], "score": list(scores[pick])})
        if best is None or scores[pick] > best:
            best, best_counts = scores[pick], counts
    details = {
        "metric": metric,
        "rounds": rounds,
        "kept_rounds": int(best_counts.sum()),
        "val_score": list(best),  # (balanced accuracy, -NLL) or (-NLL,) of the kept prefix on validation
        "path": path,
    }
    return WeightedMean({n: int(c) for n, c in zip(names, best_counts, strict=True) if c}, GREEDY, details)


def log_probability_features(predictions: Mapping[str, SplitPredictions], names: Sequence[str]) -> np.ndarray:
    """N x (members x classes): each member's log-probabilities side by side."""
    return np.concatenate([np.log(np.maximum(predictions[n].probs.double().numpy(), LOG_FLOOR)) for n in names], 1)


def cv_grouping(groups: Sequence[str], grouped: bool) -> str:
    """What the stacking folds are grouped by, for the record: every image's lesion, images alone (no two
    share a group), or the lesions that are known with the other images alone."""
    if grouped:
        return "lesion"
    if len(set(groups)) == len(groups):
        return "image"
    return "lesion (images without a lesion id alone)"


@dataclass(frozen=True)
class Stacker:
    """A multinomial logistic regression on the members' log-probabilities, fitted on validation."""

    model: Pipeline  # standardised features, then the regression
    members: tuple[str, ...]
    n_classes: int
    details: dict

    @classmethod
    def fit(
        cls, predictions: Mapping[str, SplitPredictions], groups: Sequence[str], folds: int, grouped: bool
    ) -> Stacker:
        """``groups``: each record's lesion (an image without one stands for its own); ``grouped`` says which."""
        names = tuple(predictions)
        first = next(iter(predictions.values()))
        features, labels = log_probability_features(predictions, names), first.labels.numpy()
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=SEED)
        with warnings.catch_warnings():  # a class with fewer lesions than folds: sklearn warns, the folds still hold
            warnings.simplefilter("ignore", UserWarning)
            cv = list(splitter.split(features, labels, np.asarray(groups, dtype=str)))
            # Standardised: near-collinear members' raw log-probabilities take lbfgs thousands of iterations.
            model = make_pipeline(
                StandardScaler(),
                LogisticRegressionCV(
                    Cs=list(STACKING_CS),
                    cv=cv,
                    l1_ratios=(0.0,),  # an L2 penalty
                    class_weight="balanced",
                    scoring=STACKING_SCORING,
                    max_iter=1000,
                    use_legacy_attributes=False,
                ),
            ).fit(features, labels)
        details = {
            "model": "sklearn StandardScaler + LogisticRegressionCV (multinomial, L2, lbfgs) on the members' "
            "log-probabilities",
            "class_weight": "balanced",
            "C": float(np.ravel(model[-1].C_)[0]),
            "Cs": list(STACKING_CS),
            "cv_scoring": STACKING_SCORING,
            "cv_folds": folds,
            "cv_groups": cv_grouping(groups, grouped),
            "classes_fitted": [int(c) for c in model.classes_],
        }
        return cls(model, names, first.probs.shape[1], details)

    def combine(self, predictions: Mapping[str, SplitPredictions]) -> SplitPredictions:
        """The stacked probabilities; a class absent from validation gets 0."""
        first = predictions[self.members[0]]
        fitted = self.model.predict_proba(log_probability_features(predictions, self.members))
        probs = np.zeros((len(first), self.n_classes), dtype=np.float32)
        probs[:, self.model.classes_] = fitted
        return SplitPredictions(first.probs.new_tensor(probs), first.labels, first.indices)

    def to_dict(self) -> dict:
        return {"method": STACKING, "members": list(self.members), **self.details}


def plain_mean(names: Sequence[str]) -> WeightedMean:
    return WeightedMean(dict.fromkeys(names, 1))
