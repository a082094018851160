import numpy as np

from melanoma_detector.evaluation.metrics import (
    apply_calibration,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_bias,
)


def test_bias_undoes_class_weight_shift():
    """Scores shifted as class-weighted training shifts them: a temperature alone cannot fix
    the calibration; temperature + bias recovers the Bayes-optimal logit (T = 0.9, b = -5.25)."""
    rng = np.random.default_rng(0)
    y = (rng.random(20000) < 0.1).astype(int)
    z = rng.normal(size=y.size) * 1.5 + 2.5 * y + 1.5
    t, b = fit_temperature_bias(z, y)
    assert abs(t - 0.9) < 0.05 and abs(b + 5.25) < 0.2
    ece_t = expected_calibration_error(y, apply_calibration(z, fit_temperature(z, y)))
    ece_tb = expected_calibration_error(y, apply_calibration(z, t, b))
    assert ece_tb < 0.02 < ece_t


def test_single_class_is_identity():
    assert fit_temperature_bias(np.array([0.3, 1.2]), np.array([1, 1])) == (1.0, 0.0)
