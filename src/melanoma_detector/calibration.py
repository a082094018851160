"""The calibration map, in numpy only: the one formula that fitting and serving share.

A screening threshold is the calibrated probability of one validation melanoma (the last one it
must keep). If serving computed that probability by another formula, even one ulp lower, that
melanoma would fall below its own threshold and the promised sensitivity would be missed on the
very images it was fitted on. So export, training, evaluation, the torch-free predictor and the
checkpoint predictor all call `calibrated_probabilities`, in float64, and never a sigmoid of their own.
"""

from __future__ import annotations

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function in float64, without overflow for any finite input."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def calibrated_probabilities(logits: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """``sigmoid(logit / T + b)``: the probabilities a bundle or checkpoint serves and fits its thresholds on."""
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature + float(bias))
