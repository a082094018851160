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
    """Logistic function in float64; exactly 0 below about -709 (where exp(-z) overflows to inf)."""
    # This exact expression is what bundles have always been served with; thresholds exported before
    # it was shared were fitted with scipy's expit and still hold under it (checked for the shipped bundle).
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def calibrated_probabilities(logits: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """``sigmoid(logit / T + b)``: the probabilities a bundle or checkpoint serves and fits its thresholds on."""
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature + float(bias))
