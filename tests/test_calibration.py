"""Calibration metrics: ECE on constructed cases with known answers, temperature fitting on
labels drawn from a known scale."""
import pytest
import torch

from clipzsl.metrics import expected_calibration_error, fit_logit_scale


def confident(confidence: float, n: int, correct: int) -> tuple[torch.Tensor, list[int]]:
    """n two-class rows predicting class 0 with `confidence`; the first `correct` are right."""
    probs = torch.tensor([[confidence, 1 - confidence]]).repeat(n, 1)
    return probs, [0] * correct + [1] * (n - correct)


def test_ece_is_zero_when_confidence_equals_accuracy():
    assert expected_calibration_error(*confident(0.8, 100, 80)) == pytest.approx(0, abs=1e-6)


def test_ece_is_the_gap_for_overconfident_predictions():
    assert expected_calibration_error(*confident(0.99, 100, 50)) == pytest.approx(0.49, abs=1e-6)


def test_ece_weights_bins_by_their_share_of_images():
    a, ya = confident(0.9, 30, 30)  # gap 0.1 on 30%
    b, yb = confident(0.6, 70, 42)  # gap 0.0 on 70%
    assert expected_calibration_error(torch.cat([a, b]), ya + yb) == pytest.approx(0.03, abs=1e-6)


@pytest.mark.parametrize("true_scale", [3.0, 12.0])
def test_fit_logit_scale_recovers_the_scale_labels_were_drawn_at(true_scale):
    g = torch.Generator().manual_seed(0)
    cosines = torch.rand(4000, 20, generator=g)
    labels = torch.multinomial((cosines * true_scale).softmax(-1), 1, generator=g).squeeze(1).tolist()
    assert fit_logit_scale(cosines, labels) == pytest.approx(true_scale, rel=0.1)
