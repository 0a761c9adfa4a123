"""What a person reads about one image's prediction: its class, its probability, the k most probable classes.

Presentation, not prediction: ``predict`` writes it into its CSV and the Grad-CAM explanations into
theirs, so it sits apart from the loaded model (which the explanation tables do not need).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(probs: np.ndarray, classes: Sequence[str], k: int = 3) -> list[tuple[str, float]]:
    order = np.argsort(-probs)[:k]
    return [(classes[i], float(probs[i])) for i in order]


def format_top_k(probs: np.ndarray, classes: Sequence[str], k: int = 3) -> str:
    return "; ".join(f"{name} {p:.3f}" for name, p in top_k(probs, classes, k))


def decision(probs: np.ndarray, classes: Sequence[str]) -> dict:
    """The predicted class, its probability and the top three, as the tables of predict and explain show them."""
    k = int(probs.argmax())
    return {"pred": classes[k], "confidence": float(probs[k]), "top3": format_top_k(probs, classes)}
