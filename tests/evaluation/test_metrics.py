"""Evaluation maths against scikit-learn and independent brute-force versions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from melanoma_detector.evaluation import metrics as M


def _data(seed: int, n: int = 300, *, decimals: int | None = 2, prevalence: float = 0.3):
    """Labels and scores with a real signal; rounding the scores creates many ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2] = [0, 1]  # both classes always present
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.2 * y - 0.5)))
    if decimals is not None:
        p = np.round(p, decimals)
    return y, p


# ------------------------------------------------------------------ agreement with scikit-learn


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_ranking_metrics_match_sklearn(seed, decimals):
    y, p = _data(seed, n=40 + 50 * seed, decimals=decimals)
    assert M.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.average_precision(y, p) == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    for drop in (True, False):
        ours = M.roc_curve_points(y, p, drop_intermediate=drop)
        ref = skm.roc_curve(y, p, drop_intermediate=drop)
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b)
    for a, b in zip(M.pr_curve_points(y, p), skm.precision_recall_curve(y, p)):
        np.testing.assert_allclose(a, b)


def test_all_tied_scores():
    y = np.array([0, 1, 0, 1, 1])
    p = np.full(5, 0.5)
    assert M.roc_auc(y, p) == pytest.approx(0.5)
    assert M.average_precision(y, p) == pytest.approx(skm.average_precision_score(y, p))
    assert M.partial_auc_above_tpr(y, p) == pytest.approx(0.02)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.71])
def test_binary_metrics_match_sklearn(seed, threshold):
    y, p = _data(seed, n=500)
    m = M.binary_metrics(y, p, threshold=threshold)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert m["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert (m["n"], m["n_pos"], m["n_neg"]) == (500, y.sum(), 500 - y.sum())
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["ece"] == pytest.approx(M.expected_calibration_error(y, p, 15))
    assert m["threshold"] == threshold
    json.dumps(m, allow_nan=False)


# ------------------------------------------------------------------ undefined values


@pytest.mark.parametrize(
    "y, p",
    [
        ([1, 1, 1], [0.2, 0.6, 0.9]),  # no negatives
        ([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.9]),  # no positives
        ([], []),  # nothing at all
        ([0, 1], [0.1, 0.2]),  # nothing predicted positive at 0.5
    ],
)
def test_undefined_values_are_none(y, p):
    m = M.binary_metrics(y, p)
    text = json.dumps(m, allow_nan=False)  # no NaN anywhere
    assert "NaN" not in text
    y_arr = np.asarray(y)
    n_pos = int(y_arr.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        assert m["roc_auc"] is None
        assert m["balanced_accuracy"] is None
        assert M.partial_auc_above_tpr(y, p) is None
        assert M.delong_test(y, p, p)["p_value"] is None
    if n_pos == 0:
        assert m["sensitivity"] is None and m["average_precision"] is None
        assert M.threshold_for_sensitivity(y, p) is None
        assert M.specificity_at_sensitivity(y, p, 0.9) is None
    if n_neg == 0:
        assert m["specificity"] is None
        assert M.threshold_for_specificity(y, p) is None
    if len(y) == 0:
        assert m["accuracy"] is None and m["brier"] is None and m["ece"] is None
    if m["confusion"]["tp"] + m["confusion"]["fp"] == 0:
        assert m["ppv"] is None
    if m["confusion"]["tp"] + m["confusion"]["fp"] + m["confusion"]["fn"] == 0:
        assert m["f1"] is None


def test_undefined_curves_raise_value_error():
    with pytest.raises(ValueError):
        M.roc_curve_points([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError):
        M.pr_curve_points([0, 0], [0.2, 0.3])


@pytest.mark.parametrize(
    "y, p",
    [([0, 1, 2], [0.1, 0.2, 0.3]), ([0, 1], [0.1, np.nan]), ([0, 1], [0.1]), ([0, 1], [0.1, 1.5])],
)
def test_invalid_input_raises(y, p):
    with pytest.raises(ValueError):
        M.binary_metrics(y, p)


# ------------------------------------------------------------------ thresholds


def _sens(y, p, t):
    return np.mean(p[y == 1] >= t)


def _spec(y, p, t):
    return np.mean(p[y == 0] < t)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_is_largest_meeting_target(seed, target):
    y, p = _data(seed, n=60 + 40 * seed)
    t = M.threshold_for_sensitivity(y, p, target)
    assert _sens(y, p, t) >= target - 1e-12
    higher = np.unique(p[p > t])
    if higher.size:  # any larger candidate threshold misses the target
        assert _sens(y, p, higher.min()) < target
    assert M.specificity_at_sensitivity(y, p, target) == pytest.approx(_spec(y, p, t))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_for_specificity_is_smallest_meeting_target(seed, target):
    y, p = _data(seed, n=60 + 40 * seed)
    t = M.threshold_for_specificity(y, p, target)
    assert _spec(y, p, t) >= target - 1e-12
    lower = np.unique(p[p < t])
    if lower.size:  # the next smaller candidate threshold misses the target
        assert _spec(y, p, lower.max()) < target
    assert M.sensitivity_at_specificity(y, p, target) == pytest.approx(_sens(y, p, t))


def test_threshold_exact_fraction_not_overshot():
    # 20 positives, target 0.95 -> exactly 19 must be caught (0.95 * 20 is 19.000000000000004)
    y = np.r_[np.ones(20, int), np.zeros(5, int)]
    p = np.r_[np.linspace(0.05, 1.0, 20), np.full(5, 0.01)]
    t = M.threshold_for_sensitivity(y, p, 0.95)
    assert np.sum(p[y == 1] >= t) == 19


def test_threshold_target_validation():
    with pytest.raises(ValueError):
        M.threshold_for_sensitivity([0, 1], [0.1, 0.9], 0.0)
    with pytest.raises(ValueError):
        M.threshold_for_specificity([0, 1], [0.1, 0.9], 1.5)


# ------------------------------------------------------------------ partial AUC (ISIC 2024)


def _isic_kaggle_pauc(y, p, min_tpr=0.80):
    """The ISIC 2024 Kaggle scorer (flip labels and scores, partial AUC up to max_fpr)."""
    v_gt = np.abs(np.asarray(y) - 1)
    v_pred = -1.0 * np.asarray(p)
    max_fpr = abs(1 - min_tpr)
    fpr, tpr, _ = skm.roc_curve(v_gt, v_pred)
    stop = np.searchsorted(fpr, max_fpr, "right")
    x_interp = [fpr[stop - 1], fpr[stop]]
    y_interp = [tpr[stop - 1], tpr[stop]]
    tpr = np.append(tpr[:stop], np.interp(max_fpr, x_interp, y_interp))
    fpr = np.append(fpr[:stop], max_fpr)
    return skm.auc(fpr, tpr)


def _brute_force_pauc(y, p, min_tpr=0.80, n_grid=400_001):
    """Dense-grid integral of max(TPR(FPR) - min_tpr, 0), TPR interpolated on the full curve."""
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    grid = np.linspace(0.0, 1.0, n_grid)
    # on vertical segments np.interp picks one end; that only affects a null set of the grid
    curve = np.interp(grid, fpr, tpr)
    return np.trapezoid(np.maximum(curve - min_tpr, 0.0), grid)


def test_partial_auc_extremes():
    y = np.r_[np.zeros(50, int), np.ones(30, int)]
    p = np.r_[np.linspace(0, 0.4, 50), np.linspace(0.6, 1, 30)]
    assert M.partial_auc_above_tpr(y, p) == pytest.approx(0.2)
    assert M.partial_auc_above_tpr(y, -p) == pytest.approx(0.0)
    assert M.partial_auc_above_tpr(y, p, min_tpr=0.5) == pytest.approx(0.5)
    assert M.partial_auc_above_tpr(y, p, min_tpr=0.0) == pytest.approx(M.roc_auc(y, p))


def test_partial_auc_random_classifier():
    rng = np.random.default_rng(0)
    y = (rng.random(40_000) < 0.5).astype(int)
    p = rng.random(40_000)
    value = M.partial_auc_above_tpr(y, p)
    assert 0.0 <= value <= 0.2
    assert value == pytest.approx(0.02, abs=0.004)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("min_tpr", [0.8, 0.9, 0.5])
def test_partial_auc_matches_kaggle_and_brute_force(seed, decimals, min_tpr):
    y, p = _data(seed, n=80 + 40 * seed, decimals=decimals)
    ours = M.partial_auc_above_tpr(y, p, min_tpr)
    assert ours == pytest.approx(_isic_kaggle_pauc(y, p, min_tpr), abs=1e-12)
    assert ours == pytest.approx(_brute_force_pauc(y, p, min_tpr), abs=2e-5)
    assert 0.0 <= ours <= 1.0 - min_tpr


# ------------------------------------------------------------------ calibration


def test_ece_by_hand():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.05, 0.5, 0.52, 1.0])
    # 15 bins: {0.05, 0.05} -> |0.5 - 0.05|; {0.5, 0.52} (bin 7) -> |0.5 - 0.51|; {1.0} -> 0
    expected = (2 * 0.45 + 2 * 0.01 + 0.0) / 5
    assert M.expected_calibration_error(y, p) == pytest.approx(expected)
    assert M.brier_score(y, p) == pytest.approx(skm.brier_score_loss(y, p))


def test_ece_small_for_calibrated_predictions():
    rng = np.random.default_rng(3)
    p = rng.random(50_000)
    y = (rng.random(50_000) < p).astype(int)
    assert M.expected_calibration_error(y, p) < 0.015


def _overconfident(seed=0, n=20_000):
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-true_logit))).astype(int)
    return true_logit * 3.0, y  # a model three times too confident


def test_temperature_scaling_fixes_overconfidence():
    logits, y = _overconfident()
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    before = M.apply_temperature(logits, 1.0)
    after = M.apply_temperature(logits, t)
    ece_before = M.expected_calibration_error(y, before)
    ece_after = M.expected_calibration_error(y, after)
    assert ece_after < 0.5 * ece_before
    assert ece_after < 0.02
    assert skm.log_loss(y, after) < skm.log_loss(y, before)
    # ranking unchanged by a positive temperature
    assert M.roc_auc(y, after) == pytest.approx(M.roc_auc(y, before))
    np.testing.assert_allclose(M.apply_temperature(logits, t, return_logits=True), logits / t)


def test_temperature_scaling_on_probabilities_and_degenerate_input():
    logits, y = _overconfident(1, 5_000)
    probs = 1.0 / (1.0 + np.exp(-logits))
    t = M.fit_temperature(M.prob_to_logit(probs), y)
    assert t == pytest.approx(3.0, rel=0.15)
    assert M.fit_temperature([1.0, 2.0], [1, 1]) == 1.0  # one class: nothing to fit
    with pytest.raises(ValueError):
        M.apply_temperature([0.0], 0.0)


def test_prevalence_adjusted_ppv_npv():
    y, p = _data(7, n=1000)
    m = M.binary_metrics(y, p, threshold=0.5)
    adj = M.prevalence_adjusted_ppv_npv(m["sensitivity"], m["specificity"], m["prevalence"])
    assert adj["ppv"] == pytest.approx(m["ppv"])
    assert adj["npv"] == pytest.approx(m["npv"])
    low = M.prevalence_adjusted_ppv_npv(0.9, 0.8, 0.01)
    assert low["ppv"] == pytest.approx(0.9 * 0.01 / (0.9 * 0.01 + 0.2 * 0.99))
    assert low["npv"] == pytest.approx(0.8 * 0.99 / (0.8 * 0.99 + 0.1 * 0.01))
    assert M.prevalence_adjusted_ppv_npv(0.0, 1.0, 0.3)["ppv"] is None  # nothing called positive
    assert M.prevalence_adjusted_ppv_npv(1.0, 0.0, 0.3)["npv"] is None
    undefined = {"ppv": None, "npv": None, "prevalence": 0.1}
    assert M.prevalence_adjusted_ppv_npv(None, 0.9, 0.1) == undefined


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_coverage_of_true_auc():
    """Percentile bootstrap CI of the AUC covers the true AUC at about the nominal 95 %."""
    d = 1.0
    true_auc = stats.norm.cdf(d / math.sqrt(2.0))
    rng = np.random.default_rng(2024)
    n_sim, n = 100, 200
    covered = 0
    for i in range(n_sim):
        y = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
        p = rng.normal(size=n) + d * y
        ci = M.bootstrap_ci(y, p, M.roc_auc, n_resamples=200, seed=i)
        assert ci.n_valid == 200 and ci.n_skipped == 0
        assert ci.low <= ci.estimate <= ci.high
        covered += ci.low <= true_auc <= ci.high
    assert 0.85 <= covered / n_sim <= 0.99


def test_row_wise_auc_equals_the_one_row_auc_with_ties_and_single_class_rows():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=(50, 40))
    y[3] = 1  # one class only: NaN
    p = np.round(rng.random((50, 40)), 1)  # many ties
    got = M.roc_auc_batch(y, p)
    want = [M.roc_auc(a, b) for a, b in zip(y, p)]
    assert np.isnan(got[3]) and want[3] is None
    np.testing.assert_allclose(np.delete(got, 3), np.delete(np.array(want, dtype=float), 3), rtol=0, atol=1e-12)


def test_bootstrap_generic_path_matches_vectorised_path():
    y, p = _data(11, n=300, decimals=None)
    fast = M.bootstrap_ci(y, p, M.roc_auc, n_resamples=400, seed=1)
    slow = M.bootstrap_ci(y, p, lambda a, b: M.roc_auc(a, b), n_resamples=400, seed=1)
    assert fast.estimate == slow.estimate
    # the same resamples through both paths: the same interval, not merely a close one
    assert fast.low == pytest.approx(slow.low, abs=1e-12)
    assert fast.high == pytest.approx(slow.high, abs=1e-12)
    low, high = fast  # unpacks as (low, high)
    assert (low, high) == (fast.low, fast.high)
    assert set(fast.to_dict()) >= {"low", "high", "n_valid"}


def test_bootstrap_skips_undefined_resamples():
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    p = np.linspace(0, 1, 8)
    ci = M.bootstrap_ci(y, p, M.roc_auc, n_resamples=300, seed=0)
    # P(no positive drawn) = (7/8)^8 ~ 0.34
    assert 50 < ci.n_skipped < 160
    assert ci.n_valid + ci.n_skipped == 300
    ci2 = M.bootstrap_ci(y, p, M.average_precision, n_resamples=300, seed=0)
    assert ci2.n_valid + ci2.n_skipped == 300 and ci2.n_skipped > 50
    none = M.bootstrap_ci([1, 1, 1], [0.1, 0.2, 0.3], M.roc_auc, n_resamples=20)
    assert (none.low, none.high, none.estimate, none.n_valid) == (None, None, None, 0)


def test_cluster_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(5)
    n_groups, per_group = 60, 5
    y0 = (rng.random(n_groups) < 0.5).astype(int)
    y0[:2] = [0, 1]
    p0 = rng.normal(size=n_groups) + y0
    # every patient contributes five copies of the same lesion: five-fold pseudo-replication
    y, p = np.repeat(y0, per_group), np.repeat(p0, per_group)
    groups = np.repeat(np.arange(n_groups), per_group)
    naive = M.bootstrap_ci(y, p, M.roc_auc, n_resamples=300, seed=0)
    cluster = M.bootstrap_ci(y, p, M.roc_auc, n_resamples=300, seed=0, groups=groups)
    single = M.bootstrap_ci(y0, p0, M.roc_auc, n_resamples=300, seed=0)
    assert cluster.cluster and not naive.cluster
    w_naive, w_cluster, w_single = (c.high - c.low for c in (naive, cluster, single))
    assert w_cluster > 1.6 * w_naive  # ~ sqrt(5) wider
    assert w_cluster == pytest.approx(w_single, rel=0.3)

    # every resample consists of whole groups, and as many groups as there are
    seen = []

    def record(a, b):
        seen.append((a.copy(), b.copy()))
        return M.roc_auc(a, b)

    M.bootstrap_ci(y, p, record, n_resamples=5, seed=0, groups=groups)
    for a, b in seen[1:]:  # the first call is the point estimate
        assert a.size == y.size
        vals, counts = np.unique(b, return_counts=True)
        assert np.all(counts % per_group == 0)


# ------------------------------------------------------------------ DeLong


def _delong_slow(y, p1, p2):
    """DeLong et al. (1988) with explicit O(m n) placement values."""
    y = np.asarray(y)
    out = []
    for p in (p1, p2):
        x, w = p[y == 1], p[y == 0]
        psi = (x[:, None] > w[None, :]) + 0.5 * (x[:, None] == w[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    aucs = np.array([o[0] for o in out])
    v10 = np.vstack([o[1] for o in out])
    v01 = np.vstack([o[2] for o in out])
    s = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    return aucs, (aucs[0] - aucs[1]) / math.sqrt(var)


def test_delong_identical_predictions():
    y, p = _data(1, n=200)
    r = M.delong_test(y, p, p)
    assert r["diff"] == 0.0 and r["z"] == 0.0 and r["p_value"] == 1.0
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("decimals", [None, 1])
def test_delong_matches_slow_reference(decimals):
    rng = np.random.default_rng(8)
    n = 300
    y = (rng.random(n) < 0.4).astype(int)
    base = rng.normal(size=n)
    p1 = base + 1.0 * y + 0.5 * rng.normal(size=n)
    p2 = base + 0.7 * y + 0.5 * rng.normal(size=n)
    if decimals is not None:
        p1, p2 = np.round(p1, decimals), np.round(p2, decimals)
    r = M.delong_test(y, p1, p2)
    aucs, z = _delong_slow(y, p1, p2)
    assert r["auc1"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert r["auc2"] == pytest.approx(skm.roc_auc_score(y, p2))
    assert [r["auc1"], r["auc2"]] == pytest.approx(aucs.tolist())
    assert r["z"] == pytest.approx(z, rel=1e-9)
    assert r["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    assert r["ci_low"] < r["diff"] < r["ci_high"]


def test_delong_z_close_to_paired_bootstrap():
    rng = np.random.default_rng(9)
    n = 400
    y = (rng.random(n) < 0.35).astype(int)
    base = rng.normal(size=n)
    p1 = base + 1.0 * y + 0.6 * rng.normal(size=n)
    p2 = base + 0.8 * y + 0.6 * rng.normal(size=n)
    r = M.delong_test(y, p1, p2)
    idx = rng.integers(0, n, size=(1000, n))
    diffs = M.roc_auc_batch(y[idx], p1[idx]) - M.roc_auc_batch(y[idx], p2[idx])
    z_boot = r["diff"] / np.std(diffs, ddof=1)
    assert r["z"] == pytest.approx(z_boot, rel=0.2)
    assert r["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.15)


def test_clustered_delong_is_delong_when_every_group_holds_one_image():
    rng = np.random.default_rng(11)
    n = 300
    y = (rng.random(n) < 0.3).astype(int)
    p1, p2 = np.round(rng.normal(size=n) + y, 1), np.round(rng.normal(size=n) + 0.6 * y, 1)  # with ties
    plain, clustered = M.delong_test(y, p1, p2), M.delong_test(y, p1, p2, groups=np.arange(n))
    assert clustered["n_groups"] == n
    for k in ("auc1", "auc2", "diff", "se", "z", "p_value", "ci_low", "ci_high"):
        assert clustered[k] == pytest.approx(plain[k], rel=1e-9), k


def _lesion_study(rng, lesions_pos=94, lesions_neg=1052, images=(1, 4)):
    """Two equally good models on lesions photographed 1-3 times: the same lesion scores alike in every image."""
    lesion_y = np.r_[np.ones(lesions_pos, int), np.zeros(lesions_neg, int)]
    k = rng.integers(*images, size=lesion_y.size)
    gid = np.repeat(np.arange(lesion_y.size), k)
    y = lesion_y[gid]
    truth = rng.normal(size=lesion_y.size) + 1.6 * lesion_y
    # each model: the lesion's truth + the model's own view of the lesion + a little per-image noise
    p1 = (truth + rng.normal(size=lesion_y.size))[gid] + 0.3 * rng.normal(size=gid.size)
    p2 = (truth + rng.normal(size=lesion_y.size))[gid] + 0.3 * rng.normal(size=gid.size)
    return y, p1, p2, gid


def test_clustered_delong_keeps_its_level_where_plain_delong_does_not():
    """Under the null (two equally good models) on lesion-clustered images, the plain test rejects far more often
    than 5 %; the clustered one keeps close to it."""
    rng = np.random.default_rng(12)
    plain = clustered = 0
    runs = 300
    for _ in range(runs):
        y, p1, p2, gid = _lesion_study(rng)
        plain += M.delong_test(y, p1, p2)["p_value"] < 0.05
        clustered += M.delong_test(y, p1, p2, groups=gid)["p_value"] < 0.05
    assert plain / runs > 0.09
    assert 0.02 <= clustered / runs <= 0.08


def test_clustered_delong_se_matches_a_lesion_bootstrap():
    rng = np.random.default_rng(13)
    y, p1, p2, gid = _lesion_study(rng, lesions_pos=150, lesions_neg=600)
    r = M.delong_test(y, p1, p2, groups=gid)
    lesions = np.unique(gid)
    members = [np.nonzero(gid == g)[0] for g in lesions]
    diffs = []
    for _ in range(600):
        idx = np.concatenate([members[i] for i in rng.integers(0, lesions.size, lesions.size)])
        diffs.append(M.roc_auc(y[idx], p1[idx]) - M.roc_auc(y[idx], p2[idx]))
    assert r["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.15)


def test_clustered_delong_with_one_group_holding_every_positive_gives_no_p_value():
    y = np.array([1, 1, 0, 0, 0, 0])
    r = M.delong_test(y, [0.9, 0.8, 0.1, 0.5, 0.3, 0.2], [0.7, 0.9, 0.4, 0.1, 0.2, 0.3], groups=[0, 0, 1, 2, 3, 4])
    assert r["p_value"] is None and r["auc1"] == 1.0 and r["n_groups"] == 5
    with pytest.raises(ValueError, match="groups has 2 entries for 6 samples"):
        M.delong_test(y, [0.1] * 6, [0.2] * 6, groups=[0, 1])


def test_fit_operating_points_meets_both_targets_on_its_own_images():
    from melanoma_detector.evaluation.metrics import apply_calibration, fit_operating_points

    rng = np.random.default_rng(3)
    y = (rng.random(600) < 0.2).astype(int)
    z = rng.normal(1.5 * y, 1.0)
    t, b, th = fit_operating_points(z, y)
    p = apply_calibration(z, t, b)
    assert np.mean(p[y == 1] >= th["screening"]) >= 0.95
    assert np.mean(p[y == 0] < th["high_specificity"]) >= 0.90
    assert th["screening"] < th["high_specificity"]


def test_a_threshold_margin_never_moves_an_image_across_it():
    """The high-specificity threshold sits just above its boundary negative: a relative margin of 1e-5 would have
    turned that negative positive (specificity 0.9 -> 0.8 on the images it was fitted on)."""
    neg = np.r_[np.linspace(-3, -1, 8), 0.0, 2.0]
    pos = np.r_[1e-6, np.linspace(0.5, 3, 9)]
    z = np.r_[neg, pos]
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    t, b, th = M.fit_operating_points(z, y)
    p = M.apply_calibration(z, t, b)
    for k, target in (("screening", ("sensitivity", 0.95)), ("high_specificity", ("specificity", 0.90))):
        moved = M.with_margin(th[k], p)
        assert moved < th[k]
        assert M.binary_metrics(y, p, threshold=moved)[target[0]] >= target[1], k
        assert ((p >= moved) == (p >= th[k])).all(), k
    assert M.with_margin(0.5, [0.9, 0.8]) == pytest.approx(0.5 * (1 - 1e-5))  # nothing below: the plain margin


def test_perfectly_separated_calibration_images_are_warned_about(caplog):
    """A tiny validation set with no overlap put the screening threshold at 0.99999, silently."""
    caplog.set_level("WARNING")
    y = np.r_[np.zeros(8, int), np.ones(4, int)]
    M.fit_operating_points(np.r_[np.linspace(-4, -1, 8), np.linspace(2, 5, 4)], y)
    assert any("separate the classes perfectly (8 benign, 4 malignant)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    M.fit_operating_points(np.r_[np.linspace(-4, 3, 8), np.linspace(-1, 5, 4)], y)  # overlapping: no warning
    assert not caplog.records
