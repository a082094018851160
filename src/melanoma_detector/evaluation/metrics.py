"""Evaluation metrics for a binary (benign = 0, malignant = 1) classifier, in plain numpy/scipy.

Conventions used throughout:

* ``y`` holds labels in {0, 1} (1 = malignant, the positive class); ``p`` holds scores, usually
  the predicted probability of malignancy. Curves and ranking metrics accept any real scores;
  the calibration metrics (Brier, ECE) need probabilities in [0, 1].
* A sample is predicted positive when ``p >= threshold`` (the same rule as the thresholds that
  scikit-learn's ``roc_curve`` / ``precision_recall_curve`` return).
* A value that is undefined for the data (AUC with one class only, PPV with no positive
  prediction, ...) is ``None`` (JSON ``null``), never NaN and never an exception.

Invalid input (mismatched lengths, labels other than 0/1, NaN scores) raises ``ValueError``.
No torch here: this module must import on a machine without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from melanoma_detector.calibration import calibrated_probabilities, sigmoid

log = logging.getLogger(__name__)

__all__ = [
    "BootstrapCI",
    "apply_calibration",
    "apply_temperature",
    "average_precision",
    "binary_metrics",
    "bootstrap_ci",
    "brier_score",
    "confusion_at_threshold",
    "delong_test",
    "expected_calibration_error",
    "fit_operating_points",
    "fit_temperature",
    "fit_temperature_bias",
    "partial_auc_above_tpr",
    "pr_curve_points",
    "prevalence_adjusted_ppv_npv",
    "prob_to_logit",
    "reliability_bins",
    "roc_auc",
    "roc_auc_batch",
    "roc_curve_points",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
    "threshold_for_sensitivity",
    "threshold_for_specificity",
    "with_margin",
]

ArrayLike = Any  # numpy array, list, pandas Series ...


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _labels(y: ArrayLike) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        y = y.reshape(-1)
    if y.dtype == bool:
        return y.astype(np.int64)
    if y.size and not np.all(np.isin(y, (0, 1))):
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 (benign) or 1 (malignant); got {bad.tolist()}")
    return y.astype(np.int64)


def _scores(p: ArrayLike, *, probabilities: bool = False, name: str = "scores") -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contain NaN or infinite values")
    if probabilities and p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1]")
    return p


def _inputs(
    y: ArrayLike, p: ArrayLike, *, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    yy = _labels(y)
    pp = _scores(p, probabilities=probabilities)
    if yy.shape != pp.shape:
        raise ValueError(f"labels and scores differ in length: {yy.size} vs {pp.size}")
    return yy, pp


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# ranking metrics and curves
# --------------------------------------------------------------------------------------------


def roc_auc(y: ArrayLike, p: ArrayLike) -> float | None:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half).

    Equal to scikit-learn's ``roc_auc_score``. ``None`` if either class is absent.
    """
    yy, pp = _inputs(y, p)
    n_pos = int(yy.sum())
    n_neg = yy.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(pp)  # mid-ranks for ties
    u = ranks[yy == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_batch(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Row-wise AUC of 2-D arrays ``y`` and ``p`` (shape ``(B, n)``); NaN where undefined.

    Vectorised Mann-Whitney, used by the bootstrap; NaN (not None) marks rows with one class.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError("roc_auc_batch needs two 2-D arrays of the same shape")
    ranks = stats.rankdata(p, axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _binary_clf_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative false/true positives at each distinct score, scores in decreasing order."""
    order = np.argsort(p, kind="mergesort")[::-1]
    p_sorted = p[order]
    y_sorted = y[order].astype(np.float64)
    distinct = np.where(np.diff(p_sorted))[0]
    idx = np.r_[distinct, y_sorted.size - 1]
    tps = np.cumsum(y_sorted)[idx]
    fps = 1.0 + idx - tps
    return fps, tps, p_sorted[idx]


def roc_curve_points(
    y: ArrayLike, p: ArrayLike, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` exactly as scikit-learn's ``roc_curve``.

    The first threshold is ``inf`` (nothing predicted positive); thresholds decrease.
    Raises ``ValueError`` when either class is absent (the curve is undefined).
    """
    yy, pp = _inputs(y, p)
    n_pos = int(yy.sum())
    if n_pos == 0 or n_pos == yy.size:
        raise ValueError("ROC curve is undefined: the labels hold only one class")
    fps, tps, thr = _binary_clf_curve(yy, pp)
    if drop_intermediate and fps.size > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps = np.r_[0.0, fps]
    tps = np.r_[0.0, tps]
    thr = np.r_[np.inf, thr]
    return fps / fps[-1], tps / tps[-1], thr


def pr_curve_points(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` as scikit-learn's ``precision_recall_curve``.

    Thresholds increase; precision and recall have one more element than thresholds (the final
    point precision = 1, recall = 0). Raises ``ValueError`` when there is no positive sample.
    """
    yy, pp = _inputs(y, p)
    if yy.size == 0 or yy.sum() == 0:
        raise ValueError("precision-recall curve is undefined: there is no positive sample")
    fps, tps, thr = _binary_clf_curve(yy, pp)
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0)
    recall = tps / tps[-1]
    rev = slice(None, None, -1)
    return np.r_[precision[rev], 1.0], np.r_[recall[rev], 0.0], thr[rev]


def average_precision(y: ArrayLike, p: ArrayLike) -> float | None:
    """Step-wise average precision, sum over thresholds of (R_k - R_{k-1}) * P_k.

    Equal to scikit-learn's ``average_precision_score``. ``None`` if there is no positive.
    """
    yy, pp = _inputs(y, p)
    if yy.size == 0 or yy.sum() == 0:
        return None
    precision, recall, _ = pr_curve_points(yy, pp)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def partial_auc_above_tpr(y: ArrayLike, p: ArrayLike, min_tpr: float = 0.80) -> float | None:
    """ISIC 2024 challenge metric: ROC area above the line TPR = ``min_tpr``.

    The integral over FPR in [0, 1] of ``max(TPR(FPR) - min_tpr, 0)`` on the exact (linearly
    interpolated) ROC curve, i.e. the area of the region under the curve and above the line.
    Range [0, 1 - min_tpr]: a perfect classifier scores ``1 - min_tpr`` (0.2), a random one
    about ``(1 - min_tpr)**2 / 2`` (0.02). Identical to the Kaggle scorer, which flips labels
    and scores and takes the un-standardised partial AUC up to FPR = 1 - min_tpr.
    ``None`` if either class is absent.
    """
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError("min_tpr must be in [0, 1)")
    yy, pp = _inputs(y, p)
    n_pos = int(yy.sum())
    if n_pos == 0 or n_pos == yy.size:
        return None
    fpr, tpr, _ = roc_curve_points(yy, pp, drop_intermediate=False)
    x0, x1 = fpr[:-1], fpr[1:]
    f0, f1 = tpr[:-1] - min_tpr, tpr[1:] - min_tpr
    dx = x1 - x0
    # Segments fully above the line: trapezoid. TPR never decreases, so a segment can only
    # cross the line upwards (f0 < 0 <= f1): the triangle from the crossing point to x1.
    above = (f0 >= 0) & (f1 >= 0)
    area = np.sum(np.where(above, 0.5 * (f0 + f1) * dx, 0.0))
    cross = (f0 < 0) & (f1 > 0)
    if np.any(cross):
        c_dx, c_f0, c_f1 = dx[cross], f0[cross], f1[cross]
        width_above = c_dx * c_f1 / (c_f1 - c_f0)
        area += np.sum(0.5 * width_above * c_f1)
    return float(min(max(area, 0.0), 1.0 - min_tpr))


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------


def _check_target(target: float, name: str) -> None:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target {name} must be in (0, 1]; got {target}")


def _count_needed(target: float, n: int) -> int:
    # ceil with a little slack, so that 0.95 * 20 = 19.000000000000004 needs 19, not 20
    return max(1, min(n, int(math.ceil(target * n - 1e-9))))


def threshold_for_sensitivity(y: ArrayLike, p: ArrayLike, target: float = 0.95) -> float | None:
    """Largest threshold whose sensitivity (``p >= t`` among positives) is at least ``target``.

    It is the k-th largest positive score, k = ceil(target * n_pos): the most specific operating
    point that still catches the required share of melanomas on this data. ``None`` without
    positives.
    """
    _check_target(target, "sensitivity")
    yy, pp = _inputs(y, p)
    pos = np.sort(pp[yy == 1])[::-1]
    if pos.size == 0:
        return None
    k = _count_needed(target, pos.size)
    return float(pos[k - 1])


def threshold_for_specificity(y: ArrayLike, p: ArrayLike, target: float = 0.90) -> float | None:
    """Smallest threshold whose specificity (``p < t`` among negatives) is at least ``target``.

    The threshold is the smallest observed score above the k-th smallest negative score,
    k = ceil(target * n_neg) (or the next float above it when no score is larger): the most
    sensitive operating point that keeps the required specificity on this data. ``None``
    without negatives.
    """
    _check_target(target, "specificity")
    yy, pp = _inputs(y, p)
    neg = np.sort(pp[yy == 0])
    if neg.size == 0:
        return None
    k = _count_needed(target, neg.size)
    bound = neg[k - 1]
    higher = pp[pp > bound]
    if higher.size:
        return float(higher.min())
    return float(np.nextafter(bound, np.inf))


def with_margin(threshold: float, p: ArrayLike, *, rel: float = 1e-5) -> float:
    """`threshold` moved down by `rel` of itself, but no further than halfway to the highest score in `p` below it,
    so that every score keeps its side of the rule ``p >= threshold``."""
    pp = np.asarray(p, dtype=np.float64).ravel()
    below = pp[pp < threshold]
    lowered = threshold * (1.0 - rel)
    return float(max(lowered, (below.max() + threshold) / 2.0)) if below.size else float(lowered)


def confusion_at_threshold(y: ArrayLike, p: ArrayLike, threshold: float) -> dict[str, int]:
    """Confusion counts ``{"tn", "fp", "fn", "tp"}`` with the rule ``p >= threshold``."""
    yy, pp = _inputs(y, p)
    pred = pp >= threshold
    pos = yy == 1
    return {
        "tn": int(np.sum(~pred & ~pos)),
        "fp": int(np.sum(pred & ~pos)),
        "fn": int(np.sum(~pred & pos)),
        "tp": int(np.sum(pred & pos)),
    }


def specificity_at_sensitivity(y: ArrayLike, p: ArrayLike, target: float = 0.95) -> float | None:
    """Specificity at :func:`threshold_for_sensitivity`; ``None`` if either class is absent."""
    t = threshold_for_sensitivity(y, p, target)
    if t is None:
        return None
    cm = confusion_at_threshold(y, p, t)
    return _ratio(cm["tn"], cm["tn"] + cm["fp"])


def sensitivity_at_specificity(y: ArrayLike, p: ArrayLike, target: float = 0.90) -> float | None:
    """Sensitivity at :func:`threshold_for_specificity`; ``None`` if either class is absent."""
    t = threshold_for_specificity(y, p, target)
    if t is None:
        return None
    cm = confusion_at_threshold(y, p, t)
    return _ratio(cm["tp"], cm["tp"] + cm["fn"])


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def brier_score(y: ArrayLike, p: ArrayLike) -> float | None:
    """Mean squared difference between probability and label; ``None`` for no samples."""
    yy, pp = _inputs(y, p, probabilities=True)
    if yy.size == 0:
        return None
    return float(np.mean((pp - yy) ** 2))


def reliability_bins(y: ArrayLike, p: ArrayLike, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width bins on [0, 1] of the predicted probability of malignancy.

    Returns arrays (length ``n_bins``): ``edges`` (n_bins + 1), ``count``, ``mean_pred``,
    ``frac_pos`` (NaN for empty bins). Bin i holds the p with ``floor(p * n_bins) == i``, which is
    ``edges[i] <= p < edges[i+1]`` up to the rounding of ``edges`` (p = 0.3 lands in bin 2 of 10,
    not 3); the last bin also holds p = 1. The ECE bins the same way.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    yy, pp = _inputs(y, p, probabilities=True)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.minimum((pp * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=pp, minlength=n_bins)
    sum_y = np.bincount(idx, weights=yy.astype(np.float64), minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_pred = np.where(count > 0, sum_p / count, np.nan)
        frac_pos = np.where(count > 0, sum_y / count, np.nan)
    return {"edges": edges, "count": count, "mean_pred": mean_pred, "frac_pos": frac_pos}


def expected_calibration_error(y: ArrayLike, p: ArrayLike, n_bins: int = 15) -> float | None:
    """ECE of the malignancy probability: sum over equal-width bins of
    ``(n_bin / n) * |fraction malignant - mean predicted probability|``. ``None`` if empty."""
    bins = reliability_bins(y, p, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return None
    filled = bins["count"] > 0
    gaps = np.abs(bins["frac_pos"][filled] - bins["mean_pred"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / n)


def prob_to_logit(p: ArrayLike, eps: float = 1e-7) -> np.ndarray:
    """Logit of probabilities clipped to [eps, 1 - eps] (for temperature scaling of saved
    probabilities when the logits were not kept)."""
    pp = np.clip(_scores(p, probabilities=True, name="probabilities"), eps, 1.0 - eps)
    return special.logit(pp)


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    # -[y log s(z) + (1 - y) log(1 - s(z))] = log(1 + e^z) - y z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(
    logits: ArrayLike, y: ArrayLike, *, bounds: tuple[float, float] = (0.01, 100.0)
) -> float:
    """Temperature T > 0 minimising the NLL of ``sigmoid(logits / T)`` on (validation) data.

    Optimised on log T with bounded Brent search; T is kept inside ``bounds``. With fewer than
    two samples or a single class there is nothing to fit and T = 1.0 is returned.
    """
    yy = _labels(y)
    z = _scores(logits, name="logits")
    if z.shape != yy.shape:
        raise ValueError(f"logits and labels differ in length: {z.size} vs {yy.size}")
    if yy.size < 2 or yy.min() == yy.max():
        return 1.0
    lo, hi = bounds
    if not 0.0 < lo < hi:
        raise ValueError("temperature bounds must satisfy 0 < low < high")
    yf = yy.astype(np.float64)
    res = optimize.minimize_scalar(
        lambda log_t: _nll(z, yf, math.exp(log_t)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    t = float(math.exp(res.x))
    # the bounded search does not test T = 1 itself; never return a worse fit than no scaling
    if lo <= 1.0 <= hi and _nll(z, yf, 1.0) < _nll(z, yf, t):
        return 1.0
    return t


def fit_temperature_bias(logits: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """(T, b) minimising the NLL of ``sigmoid(logits / T + b)``: temperature scaling with a bias.

    The bias matters for models trained with class weights: weighting malignant cases by
    w1/w0 shifts every logit by about log(w1/w0), a shift that a temperature alone cannot undo
    (it leaves probabilities inflated and the calibration error high). Never a worse fit than
    temperature alone.
    """
    yy = _labels(y)
    z = _scores(logits, name="logits")
    if yy.size < 2 or yy.min() == yy.max():
        return 1.0, 0.0
    yf = yy.astype(np.float64)

    # In (a, c) = (1 / T, b) the NLL of sigmoid(a z + c) is convex: a 1-D logistic regression.
    def nll(params):
        zz = params[0] * z + params[1]
        return float(np.mean(np.logaddexp(0.0, zz) - yf * zz))

    def grad(params):
        r = special.expit(params[0] * z + params[1]) - yf
        return np.array([np.mean(r * z), np.mean(r)])

    res = optimize.minimize(nll, x0=[1.0, 0.0], jac=grad, method="BFGS", options={"gtol": 1e-9})
    a, c = float(res.x[0]), float(res.x[1])
    if (res.success or nll(res.x) < nll([1.0, 0.0])) and a > 1e-2:
        return min(1.0 / a, 100.0), c
    # Scores that barely rank (or rank backwards) want T above 100 or below 0: keep T within (0.01, 100]
    # and still fit the bias, which alone carries the base rate; a bias-free T would serve p near 0.5.
    t_only = fit_temperature(z, yy)
    bounded = optimize.minimize(nll, x0=[1.0 / t_only, 0.0], jac=grad, method="L-BFGS-B",
                                bounds=[(1e-2, 1e2), (None, None)])
    if nll(bounded.x) < nll([1.0 / t_only, 0.0]):
        return 1.0 / float(bounded.x[0]), float(bounded.x[1])
    return t_only, 0.0


def apply_calibration(logits: ArrayLike, temperature: float, bias: float = 0.0) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logits / T + b)``, by the formula every server uses
    (:func:`melanoma_detector.calibration.calibrated_probabilities`), so a threshold fitted on them holds
    bit for bit where the model is served."""
    return calibrated_probabilities(_scores(logits, name="logits"), temperature, bias)


# The operating points every bundle serves: the screening threshold keeps this share of the melanomas, the
# high-specificity one this share of the benign lesions, on the images calibration is fitted on.
SCREENING_SENSITIVITY = 0.95
HIGH_SPECIFICITY = 0.90


def fit_operating_points(logits: ArrayLike, y: ArrayLike) -> tuple[float, float, dict[str, float]]:
    """Temperature and bias by NLL, then the screening and high-specificity thresholds on the calibrated
    probabilities: what training, export and recalibration all fit on their calibration images."""
    if len(np.unique(_labels(y))) < 2:
        raise ValueError("operating points need both classes among the calibration images (benign and malignant)")
    temperature, bias = fit_temperature_bias(logits, y)
    p = apply_calibration(logits, temperature, bias)
    yy = _labels(y)
    z = _scores(logits, name="logits")
    if z[yy == 1].min() > z[yy == 0].max():
        # Nothing to calibrate between: the NLL drives T towards its bound and the thresholds to the gap's edge
        # (a screening threshold of 0.99999 on a small validation set), which new images will not respect.
        log.warning("the calibration images separate the classes perfectly (%d benign, %d malignant): temperature "
                    "and thresholds sit at the edge of that gap and will not hold on new images; fit them on more "
                    "validation images (or `melanoma recalibrate` on a labelled set of your own)",
                    int((yy == 0).sum()), int((yy == 1).sum()))
    return temperature, bias, {"screening": float(threshold_for_sensitivity(y, p, SCREENING_SENSITIVITY)),
                               "high_specificity": float(threshold_for_specificity(y, p, HIGH_SPECIFICITY))}


def apply_temperature(
    logits: ArrayLike, temperature: float, *, return_logits: bool = False
) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logits / T)`` (or the scaled logits)."""
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    z = _scores(logits, name="logits") / float(temperature)
    return z if return_logits else sigmoid(z)


# --------------------------------------------------------------------------------------------
# everything at one threshold
# --------------------------------------------------------------------------------------------


def binary_metrics(y_true: ArrayLike, prob: ArrayLike, *, threshold: float = 0.5) -> dict[str, Any]:
    """All headline metrics at one threshold (``prob >= threshold`` means malignant).

    Keys: n, n_pos, n_neg, prevalence, accuracy, roc_auc, average_precision, sensitivity,
    specificity, ppv, npv, balanced_accuracy, f1, confusion ({"tn", "fp", "fn", "tp"}), brier,
    ece (15 bins), threshold. Undefined values are ``None``; the dict is JSON-serialisable.
    """
    yy, pp = _inputs(y_true, prob, probabilities=True)
    n = int(yy.size)
    n_pos = int(yy.sum())
    n_neg = n - n_pos
    cm = confusion_at_threshold(yy, pp, threshold)
    tn, fp, fn, tp = cm["tn"], cm["fp"], cm["fn"], cm["tp"]
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    return {
        "n": n,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "prevalence": _ratio(n_pos, n),
        "accuracy": _ratio(tp + tn, n),
        "roc_auc": roc_auc(yy, pp),
        "average_precision": average_precision(yy, pp),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "balanced_accuracy": None if sens is None or spec is None else (sens + spec) / 2.0,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion": cm,
        "brier": brier_score(yy, pp),
        "ece": expected_calibration_error(yy, pp, 15),
        "threshold": float(threshold),
    }


def prevalence_adjusted_ppv_npv(
    sens: float | None, spec: float | None, prevalence: float
) -> dict[str, float | None]:
    """PPV and NPV expected at another prevalence (Bayes' rule), e.g. a clinic's melanoma rate
    instead of a curated test set's.

    ``ppv = sens * prev / (sens * prev + (1 - spec) * (1 - prev))``,
    ``npv = spec * (1 - prev) / (spec * (1 - prev) + (1 - sens) * prev)``.
    Returns ``{"ppv", "npv", "prevalence"}``; ``None`` where undefined.
    """
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError("prevalence must be in [0, 1]")
    if sens is None or spec is None:
        return {"ppv": None, "npv": None, "prevalence": float(prevalence)}
    for name, v in (("sensitivity", sens), ("specificity", spec)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]")
    prev = float(prevalence)
    return {
        "ppv": _ratio(sens * prev, sens * prev + (1.0 - spec) * (1.0 - prev)),
        "npv": _ratio(spec * (1.0 - prev), spec * (1.0 - prev) + (1.0 - sens) * prev),
        "prevalence": prev,
    }


# --------------------------------------------------------------------------------------------
# uncertainty
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap interval. ``low``/``high``/``estimate`` are ``None`` if undefined;
    ``n_valid`` resamples gave a defined metric, ``n_skipped`` did not (e.g. one class only)."""

    low: float | None
    high: float | None
    estimate: float | None
    n_valid: int
    n_skipped: int
    n_resamples: int
    alpha: float
    cluster: bool

    def __iter__(self):  # allows ``low, high = bootstrap_ci(...)``
        return iter((self.low, self.high))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resample_indices(
    rng: np.random.Generator, n: int, groups: np.ndarray | None, n_resamples: int
):
    """Yield index arrays: plain (n draws with replacement) or whole-group (cluster) draws."""
    if groups is None:
        for _ in range(n_resamples):
            yield rng.integers(0, n, size=n)
        return
    _, inv = np.unique(groups, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    starts = np.cumsum(counts) - counts
    n_groups = counts.size
    for _ in range(n_resamples):
        chosen = rng.integers(0, n_groups, size=n_groups)
        lens = counts[chosen]
        ends = np.cumsum(lens)
        # position j of the output lies in chosen group g: take starts[g] + (j - start of g)
        offsets = np.repeat(starts[chosen] - (ends - lens), lens) + np.arange(ends[-1])
        yield order[offsets]


def bootstrap_ci(
    y: ArrayLike,
    p: ArrayLike,
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    groups: ArrayLike | None = None,
    alpha: float = 0.05,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval of ``metric_fn(y, p)``.

    With ``groups`` (e.g. patient ids) whole groups are resampled (cluster bootstrap), so that
    several lesions of one patient do not count as independent evidence. Resamples where the
    metric is undefined (``None``, NaN, or ``ValueError``, e.g. one class only) are skipped and
    counted in ``n_skipped``. ``metric_fn`` = :func:`roc_auc` without groups runs vectorised.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    yy, pp = _inputs(y, p)
    g = None
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.shape != yy.shape:
            raise ValueError(f"groups and labels differ in length: {g.size} vs {yy.size}")

    def _call(yv: np.ndarray, pv: np.ndarray) -> float | None:
        try:
            return _finite_or_none(metric_fn(yv, pv))
        except ValueError:
            return None

    estimate = _call(yy, pp) if yy.size else None
    if yy.size == 0:
        return BootstrapCI(None, None, None, 0, n_resamples, n_resamples, alpha, g is not None)

    rng = np.random.default_rng(seed)
    if metric_fn is roc_auc and g is None:
        vals_list = []
        chunk = max(1, min(n_resamples, 4_000_000 // max(yy.size, 1)))
        done = 0
        while done < n_resamples:
            b = min(chunk, n_resamples - done)
            idx = rng.integers(0, yy.size, size=(b, yy.size))
            vals_list.append(roc_auc_batch(yy[idx], pp[idx]))
            done += b
        vals = np.concatenate(vals_list)
        vals = vals[np.isfinite(vals)]
    else:
        out = []
        for idx in _resample_indices(rng, yy.size, g, n_resamples):
            v = _call(yy[idx], pp[idx])
            if v is not None:
                out.append(v)
        vals = np.asarray(out, dtype=np.float64)

    n_valid = int(vals.size)
    if n_valid == 0:
        return BootstrapCI(None, None, estimate, 0, n_resamples, n_resamples, alpha, g is not None)
    low, high = np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0])
    return BootstrapCI(
        float(low), float(high), estimate, n_valid, n_resamples - n_valid, n_resamples, alpha,
        g is not None,
    )


def _clustered_auc_cov(v01: np.ndarray, v10: np.ndarray, aucs: np.ndarray, gid: np.ndarray, pos: np.ndarray,
                       m: int, n: int) -> tuple[np.ndarray | None, int]:
    """Obuchowski's (1997) covariance of K AUCs over the same clustered samples: (K, K), or None when fewer than
    two groups hold positives or negatives. v01 (K, m) and v10 (K, n) are the per-sample structural components."""
    n_all = int(gid.max()) + 1
    gp, gn = gid[pos], gid[~pos]
    mp = np.bincount(gp, minlength=n_all).astype(np.float64)
    nn = np.bincount(gn, minlength=n_all).astype(np.float64)
    i10, i01, i_all = int((mp > 0).sum()), int((nn > 0).sum()), int(((mp > 0) | (nn > 0)).sum())
    if i10 < 2 or i01 < 2:
        return None, i_all
    dp = np.stack([np.bincount(gp, weights=v, minlength=n_all) for v in v01]) - mp * aucs[:, None]  # (K, G)
    dn = np.stack([np.bincount(gn, weights=v, minlength=n_all) for v in v10]) - nn * aucs[:, None]
    s10 = i10 / ((i10 - 1) * m) * (dp @ dp.T)
    s01 = i01 / ((i01 - 1) * n) * (dn @ dn.T)
    s11 = i_all / (i_all - 1) * (dp @ dn.T)
    return s10 / m + s01 / n + (s11 + s11.T) / (m * n), i_all


def delong_test(y: ArrayLike, p1: ArrayLike, p2: ArrayLike, *,
                groups: ArrayLike | None = None) -> dict[str, float | None]:
    """DeLong's test of two correlated ROC AUCs (same samples, two models).

    Fast O(n log n) algorithm of Sun & Xu (2014) using mid-ranks. Returns ``auc1``, ``auc2``,
    ``diff`` (auc1 - auc2), ``se`` (of the difference), ``z``, ``p_value`` (two-sided) and a
    95 % normal interval ``ci_low``/``ci_high`` of the difference. Identical predictions give
    z = 0 and p = 1. All ``None`` if either class is absent (or n_pos, n_neg < 2).

    ``groups`` (one id per sample, e.g. the lesion): images of one lesion are not independent, and
    DeLong's variance, which treats them so, is too small (on the HAM10000 test split, 167 melanoma images
    from 94 lesions, a 5 % test rejected two equally good models 13-17 % of the time). With groups the
    structural components are summed per group and the variance is Obuchowski's (1997) clustered estimator,
    which is DeLong's when every group holds one sample. ``n_groups`` is then returned too.
    """
    yy, s1 = _inputs(y, p1)
    s2 = _scores(p2)
    if s2.shape != yy.shape:
        raise ValueError(f"the two score arrays differ in length: {s1.size} vs {s2.size}")
    g = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != yy.shape:
            raise ValueError(f"groups has {g.size} entries for {yy.size} samples")
    pos = yy == 1
    m = int(pos.sum())
    n = int(yy.size - m)
    keys = ("auc1", "auc2", "diff", "se", "z", "p_value", "ci_low", "ci_high")
    if m < 2 or n < 2:
        out: dict[str, float | None] = dict.fromkeys(keys)
        out["auc1"] = roc_auc(yy, s1)
        out["auc2"] = roc_auc(yy, s2)
        if out["auc1"] is not None and out["auc2"] is not None:
            out["diff"] = out["auc1"] - out["auc2"]
        return out

    scores = np.vstack([s1, s2])  # (2, N)
    x = scores[:, pos]  # positives, (2, m)
    w = scores[:, ~pos]  # negatives, (2, n)
    tx = stats.rankdata(x, axis=1)
    tw = stats.rankdata(w, axis=1)
    tz = stats.rankdata(np.hstack([x, w]), axis=1)
    aucs = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - tw) / m  # ... and of the negatives
    n_groups = None
    if g is None:
        cov = np.cov(v01) / m + np.cov(v10) / n
    else:
        cov, n_groups = _clustered_auc_cov(v01, v10, aucs, np.unique(g, return_inverse=True)[1], pos, m, n)
        if cov is None:  # one group holds every positive or every negative: no between-group variance to estimate
            out = dict.fromkeys(keys)
            out.update(auc1=float(aucs[0]), auc2=float(aucs[1]), diff=float(aucs[0] - aucs[1]), n_groups=n_groups)
            return out
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    out = {"auc1": float(aucs[0]), "auc2": float(aucs[1]), "diff": diff}
    if n_groups is not None:
        out["n_groups"] = n_groups
    tiny = 1e-15
    if var <= tiny:
        se = 0.0
        if abs(diff) <= 1e-12:
            z, p_value = 0.0, 1.0
        else:  # a difference with no variance: no meaningful z
            z, p_value = None, None
        out.update(se=se, z=z, p_value=p_value, ci_low=diff, ci_high=diff)
        return out
    se = math.sqrt(var)
    z = diff / se
    p_value = float(2.0 * stats.norm.sf(abs(z)))
    q = float(stats.norm.ppf(0.975))
    out.update(se=se, z=float(z), p_value=p_value, ci_low=diff - q * se, ci_high=diff + q * se)
    return out

