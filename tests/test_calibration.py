"""The calibration map: one formula for fitting the thresholds and for serving them."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import special

from melanoma_detector.calibration import calibrated_probabilities, sigmoid
from melanoma_detector.evaluation.metrics import (
    SCREENING_SENSITIVITY,
    apply_calibration,
    fit_operating_points,
    threshold_for_sensitivity,
)
from melanoma_detector.inference.predictor import Predictor


def test_sigmoid_agrees_with_expit_and_never_overflows():
    z = np.r_[np.linspace(-40, 40, 10001), -1e4, 1e4, -745.0, 710.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would raise here
        got = sigmoid(z)
    np.testing.assert_allclose(got, special.expit(z), rtol=1e-15, atol=0)
    assert got.dtype == np.float64
    assert got[-4] == 0.0 and got[-3] == 1.0


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_calibration_refuses_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        calibrated_probabilities(np.zeros(3), temperature)


def _bundle_served(logits, temperature, bias):
    return Predictor.calibrate(SimpleNamespace(temperature=temperature, logit_bias=bias), logits)


def _checkpoint_served(logits, temperature, bias):
    from melanoma_detector.models.torch_predictor import TorchPredictor

    tp = object.__new__(TorchPredictor)  # its serving arithmetic only; the model is replaced by the logits
    tp.temperature, tp.logit_bias, tp.threshold, tp.tiers = temperature, bias, 0.5, None
    tp._load = lambda path: (np.zeros(1, np.float32), None)
    tp.logits = lambda batch: np.asarray(logits, np.float32)[: len(batch)]
    rows = tp.predict_paths([str(i) for i in range(len(logits))], batch_size=len(logits))
    return np.array([r["probability_malignant"] for r in rows])


# Found by search: for this float32 logit z0, 1 / (1 + exp(-z0)) is one ulp below scipy's expit(z0), so a
# threshold fitted with one and served with the other dropped this melanoma: 19/20 kept instead of 20/20.
_Z0 = np.float32(-2.7811501026153564)
_ADVERSARIAL = (np.r_[np.linspace(0, 3, 18), _Z0, -6.0, np.full(5, -4.0)].astype(np.float32),
                np.r_[np.ones(20), np.zeros(5)])


@pytest.mark.parametrize("served", [_bundle_served, _checkpoint_served], ids=["bundle", "checkpoint"])
def test_the_melanoma_that_sets_the_threshold_is_kept_where_it_is_served(served):
    logits, y = _ADVERSARIAL
    threshold = threshold_for_sensitivity(y, apply_calibration(logits, 1.0, 0.0), SCREENING_SENSITIVITY)
    assert np.mean(served(logits, 1.0, 0.0)[y == 1] >= threshold) >= SCREENING_SENSITIVITY


def _fits():
    rng = np.random.default_rng(0)
    for _ in range(200):
        y = np.r_[np.ones(20), np.zeros(80)]
        z = np.where(y == 1, rng.normal(1.5, 1.5, 100), rng.normal(-1.5, 1.5, 100)).astype(np.float32)
        yield z, y


@pytest.mark.parametrize("served", [_bundle_served, _checkpoint_served], ids=["bundle", "checkpoint"])
def test_served_probabilities_keep_the_sensitivity_the_threshold_was_fitted_for(served):
    for logits, y in _fits():
        temperature, bias, thresholds = fit_operating_points(logits, y)
        fitted = apply_calibration(logits, temperature, bias)
        p = served(logits, temperature, bias)
        np.testing.assert_array_equal(p, fitted)  # bit for bit, not merely close
        assert np.mean(p[y == 1] >= thresholds["screening"]) >= SCREENING_SENSITIVITY


def test_the_shipped_thresholds_are_served_probabilities_of_their_boundary_images():
    """The shipped bundle's thresholds were fitted with scipy's expit; each is the calibrated probability of
    one validation image, whose float32 logit the graph returns. Served by the shared formula, that image must
    land exactly on its threshold, not one ulp below it."""
    import json
    from pathlib import Path

    meta = json.loads((Path(__file__).parents[1] / "models" / "default" / "metadata.json").read_text())
    t, b = meta["temperature"], meta["logit_bias"]
    for name, threshold in meta["thresholds"].items():
        logit = np.float32((special.logit(threshold) - b) * t)
        assert calibrated_probabilities(np.array([logit]), t, b)[0] == threshold, name


@pytest.mark.parametrize("y", [[1, 1, 1], [0, 0, 0]])
def test_operating_points_need_both_classes(y):
    with pytest.raises(ValueError, match="both classes"):
        fit_operating_points([0.1, -0.4, 2.0], y)


def test_scores_that_rank_backwards_are_calibrated_to_the_base_rate():
    """A temperature cannot flip a ranking; the bias should still carry the base rate (it used to be dropped,
    serving p near 0.5 for a 15 % prevalence)."""
    from melanoma_detector.evaluation.metrics import expected_calibration_error, fit_temperature_bias

    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.15).astype(int)
    z = -(y + rng.normal(0, 1, y.size))
    t, b = fit_temperature_bias(z, y)
    p = apply_calibration(z, t, b)
    assert 0 < t <= 100
    assert abs(p.mean() - y.mean()) < 0.01
    assert expected_calibration_error(y, p) < 0.02
