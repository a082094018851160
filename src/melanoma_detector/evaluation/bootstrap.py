"""Fast bootstrap confidence intervals for the whole evaluation metric set at once.

Calling :func:`metrics.bootstrap_ci` once per metric (about 25 of them) re-draws and re-sorts
every resample 25 times. Here a resample is a vector of *counts* (how often each image was
drawn), every metric is written as a weighted metric of those counts, and all metrics are
computed together, vectorised over a block of resamples: the scores are sorted once, ranks and
cumulative class weights per distinct score give AUC, average precision, partial AUC and the
specificity at a target sensitivity; the confusion counts at a fixed threshold are a matrix
product.

The resamples are drawn exactly as :func:`metrics.bootstrap_ci` draws them (same generator, same
seed, same whole-group draws for a cluster bootstrap), and the interval is the same percentile
interval over the resamples where the metric is defined, so for every metric the result equals
``bootstrap_ci(y, p, metric, n_resamples=..., seed=..., groups=...)`` (the tests check this),
except that the plain (ungrouped) AUC there uses a different random stream. Point estimates come
from the exact functions of :mod:`metrics`. A proportion at a threshold (sensitivity, specificity, PPV, NPV,
accuracy) then gets the union of that interval and Wilson's (``proportion_intervals="wilson-union"``, the default;
"bootstrap" leaves the percentile interval alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import stats

from melanoma_detector.evaluation import metrics as M

__all__ = ["metric_functions", "metrics_with_ci", "resample_counts", "weighted_metrics", "wilson_interval"]

ECE_BINS = 15
MIN_TPR = 0.80  # partial AUC above this sensitivity (ISIC 2024)
TARGET_SENS = 0.95  # specificity reported at this sensitivity
THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy")
PREVALENCE_METRICS = ("ppv_at_prevalence", "npv_at_prevalence")
RANKING_METRICS = ("roc_auc", "average_precision", "partial_auc_above_80tpr",
                   "specificity_at_95_sensitivity")
CALIBRATION_METRICS = ("brier", "ece")


def resample_counts(n: int, groups: np.ndarray | None, n_resamples: int, seed: int,
                    block: int) -> Any:
    """Yield ``(b, n)`` float arrays of draw counts, ``block`` resamples at a time.

    The draws are those of :func:`metrics.bootstrap_ci` with the same seed and groups (one
    ``rng.integers`` call per resample, of n samples or of n_groups whole groups), so the
    resamples are the same multisets of images; only their order, which no metric depends on,
    is not kept.
    """
    rng = np.random.default_rng(seed)
    inv = None
    if groups is not None:
        _, inv = np.unique(groups, return_inverse=True)
        inv = inv.reshape(-1)
        n_groups = int(inv.max()) + 1 if inv.size else 0
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        counts = np.empty((b, n), dtype=np.float64)
        for r in range(b):
            if inv is None:
                counts[r] = np.bincount(rng.integers(0, n, size=n), minlength=n)
            else:  # a sample is drawn as often as its group is
                counts[r] = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups)[inv]
        done += b
        yield counts


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def weighted_metrics(
    y: np.ndarray,
    p: np.ndarray,
    w: np.ndarray,
    thresholds: Mapping[str, float],
    *,
    prevalence: float | None = None,
    ranking: bool = True,
    calibration: bool = True,
) -> dict[str, np.ndarray]:
    """Every metric for each row of the count matrix ``w`` (shape ``(b, n)``); NaN where the
    metric is undefined for that resample. A row of ones gives the metrics of the data itself.

    Keys: ``roc_auc``, ``average_precision``, ``partial_auc_above_80tpr``,
    ``specificity_at_95_sensitivity`` (``ranking``), ``brier``, ``ece`` (``calibration``) and,
    for every named threshold ``t``, ``sensitivity@t``, ``specificity@t``, ``ppv@t``, ``npv@t``,
    ``accuracy@t``, ``balanced_accuracy@t`` (+ ``ppv_at_prevalence@t``, ``npv_at_prevalence@t``
    with ``prevalence``).
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    out: dict[str, np.ndarray] = {}
    pos_w = w @ y  # (b,) weighted number of malignant cases
    tot_w = w.sum(axis=1)
    neg_w = tot_w - pos_w

    if ranking:
        order = np.argsort(-p, kind="mergesort")  # decreasing score
        ps = p[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]  # first index of each distinct score
        ws = w[:, order]
        ys = y[order]
        pos_u = np.add.reduceat(ws * ys, starts, axis=1)  # (b, U): malignant weight per score
        neg_u = np.add.reduceat(ws * (1.0 - ys), starts, axis=1)
        del ws
        tps = np.cumsum(pos_u, axis=1)  # malignant with score >= this one
        fps = np.cumsum(neg_u, axis=1)
        P, N = pos_w[:, None], neg_w[:, None]
        both = (pos_w > 0) & (neg_w > 0)
        # AUC (Mann-Whitney, ties count one half): each positive beats the negatives below it
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = np.sum(pos_u * ((N - fps) + 0.5 * neg_u), axis=1) / (pos_w * neg_w)
        out["roc_auc"] = np.where(both, auc, np.nan)
        # average precision: recall increments times precision at each distinct threshold
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(tps + fps > 0, tps / np.where(tps + fps > 0, tps + fps, 1.0), 0.0)
            ap = np.sum(pos_u * prec, axis=1) / pos_w
        out["average_precision"] = np.where(pos_w > 0, ap, np.nan)
        # partial AUC above TPR = MIN_TPR on the interpolated ROC curve (see metrics.py)
        with np.errstate(divide="ignore", invalid="ignore"):
            fpr = np.concatenate([np.zeros((w.shape[0], 1)), fps / N], axis=1)
            tpr = np.concatenate([np.zeros((w.shape[0], 1)), tps / P], axis=1)
        dx = np.diff(fpr, axis=1)
        f0, f1 = tpr[:, :-1] - MIN_TPR, tpr[:, 1:] - MIN_TPR
        above = (f0 >= 0) & (f1 >= 0)
        area = np.sum(np.where(above, 0.5 * (f0 + f1) * dx, 0.0), axis=1)
        cross = (f0 < 0) & (f1 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            tri = np.where(cross, 0.5 * dx * f1 * f1 / np.where(cross, f1 - f0, 1.0), 0.0)
        area = np.clip(area + tri.sum(axis=1), 0.0, 1.0 - MIN_TPR)
        out["partial_auc_above_80tpr"] = np.where(both, area, np.nan)
        # specificity at the most specific threshold that keeps TARGET_SENS sensitivity
        k = np.maximum(1.0, np.minimum(pos_w, np.ceil(TARGET_SENS * pos_w - 1e-9)))
        first = np.argmax(tps >= k[:, None] - 1e-9, axis=1)
        fp_at = fps[np.arange(w.shape[0]), first]
        out["specificity_at_95_sensitivity"] = np.where(both, 1.0 - _div(fp_at, neg_w), np.nan)

    if calibration:
        out["brier"] = _div(w @ (p - y) ** 2, tot_w)
        idx = np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)
        onehot = np.zeros((p.size, ECE_BINS))
        onehot[np.arange(p.size), idx] = 1.0
        gap = np.abs(w @ (onehot * y[:, None]) - w @ (onehot * p[:, None]))  # |sum y - sum p|
        out["ece"] = _div(gap.sum(axis=1), tot_w)

    for name, thr in thresholds.items():
        pred = (p >= float(thr)).astype(np.float64)
        tp = w @ (pred * y)
        fp = w @ (pred * (1.0 - y))
        fn, tn = pos_w - tp, neg_w - fp
        sens, spec = _div(tp, pos_w), _div(tn, neg_w)
        out[f"sensitivity@{name}"] = sens
        out[f"specificity@{name}"] = spec
        out[f"ppv@{name}"] = _div(tp, tp + fp)
        out[f"npv@{name}"] = _div(tn, tn + fn)
        out[f"accuracy@{name}"] = _div(tp + tn, tot_w)
        out[f"balanced_accuracy@{name}"] = (sens + spec) / 2.0
        if prevalence is not None:
            q = float(prevalence)
            with np.errstate(divide="ignore", invalid="ignore"):
                ppv_num, npv_num = sens * q, spec * (1.0 - q)
                ppv_den = ppv_num + (1.0 - spec) * (1.0 - q)
                npv_den = npv_num + (1.0 - sens) * q
                out[f"ppv_at_prevalence@{name}"] = _div(ppv_num, ppv_den)
                out[f"npv_at_prevalence@{name}"] = _div(npv_num, npv_den)
    return out


def _at(key: str, thr: float) -> Callable[[np.ndarray, np.ndarray], float | None]:
    return lambda y, p: M.binary_metrics(y, p, threshold=thr)[key]


def _prev(key: str, thr: float, prevalence: float) -> Callable[[np.ndarray, np.ndarray], float | None]:
    def fn(y, p):
        m = M.binary_metrics(y, p, threshold=thr)
        return M.prevalence_adjusted_ppv_npv(m["sensitivity"], m["specificity"], prevalence)[key]

    return fn


def metric_functions(
    thresholds: Mapping[str, float],
    *,
    prevalence: float | None = None,
    ranking: bool = True,
    calibration: bool = True,
) -> dict[str, Callable[[np.ndarray, np.ndarray], float | None]]:
    """The exact (slow, one-sample) :mod:`metrics` function behind every key of
    :func:`weighted_metrics`: used for the point estimates and by the tests."""
    fns: dict[str, Callable] = {}
    if ranking:
        fns["roc_auc"] = M.roc_auc
        fns["average_precision"] = M.average_precision
        fns["partial_auc_above_80tpr"] = lambda y, p: M.partial_auc_above_tpr(y, p, MIN_TPR)
        fns["specificity_at_95_sensitivity"] = (
            lambda y, p: M.specificity_at_sensitivity(y, p, TARGET_SENS))
    if calibration:
        fns["brier"] = M.brier_score
        fns["ece"] = lambda y, p: M.expected_calibration_error(y, p, ECE_BINS)
    for name, thr in thresholds.items():
        for key in THRESHOLD_METRICS:
            fns[f"{key}@{name}"] = _at(key, float(thr))
        if prevalence is not None:
            fns[f"ppv_at_prevalence@{name}"] = _prev("ppv", float(thr), float(prevalence))
            fns[f"npv_at_prevalence@{name}"] = _prev("npv", float(thr), float(prevalence))
    return fns


def _clean(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def metrics_with_ci(
    y: Any,
    p: Any,
    thresholds: Mapping[str, float],
    *,
    groups: Any | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    prevalence: float | None = None,
    ranking: bool = True,
    calibration: bool = True,
    max_block_elements: int = 2_000_000,
    proportion_intervals: str = "wilson-union",
) -> dict[str, dict[str, Any]]:
    """``{metric: {"value", "ci95": [low, high], "n_valid"}}`` for every metric of
    :func:`weighted_metrics`: exact point estimate plus a percentile bootstrap interval
    (``1 - alpha``), resampling whole ``groups`` (e.g. lesion ids) when given.

    ``low``/``high`` are ``None`` when no resample gave a defined value; ``n_valid`` counts the
    resamples that did (e.g. the AUC is undefined in a resample with one class only).
    """
    yy, pp = M._inputs(y, p, probabilities=True)
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    g = None
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.shape != yy.shape:
            raise ValueError(f"groups and labels differ in length: {g.size} vs {yy.size}")
    opts = dict(prevalence=prevalence, ranking=ranking, calibration=calibration)
    fns = metric_functions(thresholds, **opts)
    out: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        try:
            value = _clean(fn(yy, pp)) if yy.size else None
        except ValueError:
            value = None
        out[name] = {"value": value, "ci95": [None, None], "n_valid": 0}
    if yy.size == 0:
        return out
    block = max(1, min(n_resamples, max_block_elements // max(yy.size, 1)))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    for w in resample_counts(yy.size, g, n_resamples, seed, block):
        vals = weighted_metrics(yy, pp, w, thresholds, **opts)
        for name in fns:
            parts[name].append(vals[name])
    q = [alpha / 2.0, 1.0 - alpha / 2.0]
    for name in fns:
        v = np.concatenate(parts[name])
        v = v[np.isfinite(v)]
        out[name]["n_valid"] = int(v.size)
        if v.size:
            lo, hi = np.quantile(v, q)
            out[name]["ci95"] = [float(lo), float(hi)]
    if proportion_intervals == "wilson-union":
        _widen_proportions(out, yy, pp, thresholds, g, alpha)
    elif proportion_intervals != "bootstrap":
        raise ValueError(f"proportion_intervals: {proportion_intervals!r}; accepted: 'wilson-union', 'bootstrap'")
    return out


# A proportion's numerator and denominator at a threshold: (images counted, of these images), as boolean masks.
_PROPORTIONS = {
    "sensitivity": lambda pos, called: (pos & called, pos),
    "specificity": lambda pos, called: (~pos & ~called, ~pos),
    "ppv": lambda pos, called: (pos & called, called),
    "npv": lambda pos, called: (~pos & ~called, ~called),
    "accuracy": lambda pos, called: (pos == called, np.ones_like(pos)),
}


def wilson_interval(p_hat: float, n: float, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson's score interval of a proportion `p_hat` observed on `n` independent units."""
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    denom = 1.0 + z * z / n
    centre = (p_hat + z * z / (2.0 * n)) / denom
    half = z / denom * math.sqrt(max(p_hat * (1.0 - p_hat), 0.0) / n + z * z / (4.0 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _widen_proportions(out: dict[str, dict[str, Any]], y: np.ndarray, p: np.ndarray, thresholds: Mapping[str, float],
                       groups: np.ndarray | None, alpha: float) -> None:
    """The percentile bootstrap of a proportion collapses to a point at 0 % or 100 % (12 of 12 melanomas found
    gives [1, 1]) and covers the truth too rarely at small n; Wilson's interval does neither. So each proportion's
    interval is the union of the two. With lesion groups Wilson counts the groups, not the images (one lesion's
    images are not independent evidence), which can only widen it."""
    pos = y == 1
    for name, thr in thresholds.items():
        called = p >= float(thr)
        for key, masks in _PROPORTIONS.items():
            entry = out.get(f"{key}@{name}")
            if entry is None or entry["value"] is None:
                continue
            _, of = masks(pos, called)
            n = len(np.unique(groups[of])) if groups is not None else int(of.sum())
            if n == 0:
                continue
            lo, hi = wilson_interval(float(entry["value"]), n, alpha)
            b_lo, b_hi = entry["ci95"]
            entry["ci95"] = [lo if b_lo is None else min(lo, b_lo), hi if b_hi is None else max(hi, b_hi)]
