"""Out-of-distribution scores: energy and max-logit by hand, a threshold from in-distribution validation
logits, and constructed out-of-distribution logits flagged far more often than held-out lesions."""

from __future__ import annotations

import numpy as np
import pytest

from skinlesion.clinical.ood import OOD_METHODS, calibrate_ood, ood_flags, ood_score

K = 7


def test_energy_and_max_logit_of_hand_computed_logits() -> None:
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    assert ood_score(logits, "energy") == pytest.approx([-np.log(2), -np.log(4)])
    assert ood_score(logits, "energy", temperature=2.0) == pytest.approx([-2 * np.log(2), -2 * np.log(1 + np.sqrt(3))])
    assert ood_score(logits, "max_logit") == pytest.approx([0.0, -np.log(3.0)])
    with pytest.raises(ValueError, match="unknown OOD score"):
        ood_score(logits, "entropy")


@pytest.mark.parametrize("method", OOD_METHODS)
def test_out_of_distribution_logits_are_flagged_far_more_often_than_held_out_lesions(method: str) -> None:
    # In distribution: one class clearly ahead, as on the lesions the model learnt. Out: small, flat logits
    # (no class recognised), and the same pattern shifted down as a whole, which softmax cannot see.
    rng = np.random.default_rng(0)

    def lesions(n: int) -> np.ndarray:
        return rng.normal(0, 1, (n, K)) + 6 * np.eye(K)[rng.integers(0, K, n)]

    calibration = calibrate_ood(lesions(500), method)
    assert calibration.quantile == 0.95 and calibration.method == method
    held_out = ood_flags(lesions(2000), calibration).mean()
    flat = ood_flags(rng.normal(0, 0.5, (500, K)), calibration).mean()
    dim = ood_flags(lesions(500) - 5, calibration).mean()
    assert held_out == pytest.approx(0.05, abs=0.02)
    assert flat > 0.95 and dim > 0.95
