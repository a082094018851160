"""Evaluation figures (PNG, 100 dpi), drawn with matplotlib's object API.

Every function takes arrays plus an output path, writes one PNG (creating the parent folder),
and returns the path as a ``Path``. Figures are built with ``matplotlib.figure.Figure`` and the
Agg canvas directly, never through ``pyplot``: nothing needs a display, no global figure state
is touched (safe from a web server's worker threads), the user's interactive backend is left
alone, and nothing stays open after the function returns. Data for which a curve is undefined
(e.g. one class only) gives a figure with a short note instead of an exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_detector.evaluation import metrics as M

__all__ = [
    "plot_confusion",
    "plot_pr",
    "plot_reliability",
    "plot_roc",
    "plot_score_histograms",
    "plot_training_curves",
]

DPI = 100
CLASS_LABELS = ("benign", "malignant")
_LINE_COLORS = ("C2", "C4", "C1", "C5", "C6", "k")  # avoid C0/C3, the class colours
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def _figure(figsize: tuple[float, float] = (5.5, 5.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    finally:
        fig.clear()  # release artists; the figure is not registered anywhere else
    return path


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10,
            wrap=True)


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _as_arrays(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    return y, p


def roc_point(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false positive rate, true positive rate) of the rule p >= threshold."""
    cm = M.confusion_at_threshold(y, p, threshold)
    return cm["fp"] / max(cm["fp"] + cm["tn"], 1), cm["tp"] / max(cm["tp"] + cm["fn"], 1)


def finish_roc(fig, ax, path: str | Path, *, title: str, fontsize: int = 8) -> Path:
    """Square unit axes, labels, grid and legend of a ROC plot; saves it."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("False positive rate (1 − specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    _legend(ax, loc="lower right", fontsize=fontsize)
    return _save(fig, path)


def plot_roc(
    y: Any,
    p: Any,
    path: str | Path,
    operating_points: Mapping[str, float] | None = None,
    *,
    title: str = "ROC curve",
    min_tpr: float | None = 0.80,
) -> Path:
    """ROC curve with AUC, the chance line, the ISIC partial-AUC region above TPR = ``min_tpr``
    (shaded; ``None`` to omit) and named operating points ``{name: threshold}`` marked on it."""
    y, p = _as_arrays(y, p)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    try:
        fpr, tpr, _ = M.roc_curve_points(y, p, drop_intermediate=False)
    except ValueError as exc:
        _note(ax, f"ROC undefined: {exc}")
    else:
        auc = M.roc_auc(y, p)
        label = f"model (AUC = {_fmt(auc)})"
        if min_tpr is not None:
            pauc = M.partial_auc_above_tpr(y, p, min_tpr)
            label += f"\npAUC(TPR≥{min_tpr:g}) = {_fmt(pauc)}"
            ax.axhline(min_tpr, color="0.75", lw=0.8, ls=":")
            ax.fill_between(fpr, min_tpr, np.maximum(tpr, min_tpr), step=None, alpha=0.15,
                            color="C0", lw=0)
        ax.plot(fpr, tpr, color="C0", lw=2, label=label)
        for i, (name, thr) in enumerate((operating_points or {}).items()):
            if thr is None or not math.isfinite(float(thr)):
                continue
            x_pt, y_pt = roc_point(y, p, float(thr))
            ax.plot([x_pt], [y_pt], ls="none", marker=_MARKERS[i % len(_MARKERS)], ms=8,
                    color=f"C{(i + 1) % 10}", markeredgecolor="k",
                    label=f"{name}: t={float(thr):.3g} (sens {y_pt:.2f}, spec {1 - x_pt:.2f})")
    return finish_roc(fig, ax, path, title=title, fontsize=8)


def plot_pr(y: Any, p: Any, path: str | Path, *, title: str = "Precision-recall curve") -> Path:
    """Precision-recall curve (step-wise, as average precision integrates it) with AP and the
    prevalence baseline."""
    y, p = _as_arrays(y, p)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    try:
        precision, recall, _ = M.pr_curve_points(y, p)
    except ValueError as exc:
        _note(ax, f"PR curve undefined: {exc}")
    else:
        ap = M.average_precision(y, p)
        ax.step(recall, precision, where="post", color="C0", lw=2,
                label=f"model (AP = {_fmt(ap)})")
        prev = float(y.mean())
        ax.axhline(prev, ls="--", color="0.6", lw=1, label=f"prevalence = {prev:.3f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (PPV)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_confusion(
    cm: Mapping[str, int], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """2×2 confusion matrix from ``{"tn", "fp", "fn", "tp"}``: counts and row percentages
    (row = true class, so the diagonal shows specificity and sensitivity)."""
    mat = np.array([[cm.get("tn", 0), cm.get("fp", 0)], [cm.get("fn", 0), cm.get("tp", 0)]],
                   dtype=np.float64)
    rows = mat.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(rows > 0, mat / np.where(rows > 0, rows, 1), 0.0)
    fig = _figure((4.8, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            pct = f"{100 * frac[i, j]:.1f}%" if rows[i, 0] > 0 else "n/a"
            ax.text(j, i, f"{int(mat[i, j])}\n{pct}", ha="center", va="center", fontsize=12,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks([0, 1], labels=[f"pred. {c}" for c in CLASS_LABELS])
    ax.set_yticks([0, 1], labels=[f"true {c}" for c in CLASS_LABELS])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    return _save(fig, path)


def plot_reliability(
    y: Any,
    p: Any,
    path: str | Path,
    p_after: Any | None = None,
    *,
    n_bins: int = 15,
    title: str = "Reliability diagram",
    labels: tuple[str, str] = ("before", "after temperature scaling"),
) -> Path:
    """Reliability diagram of the malignancy probability (fraction malignant vs. mean predicted
    probability per equal-width bin, with ECE), optionally before/after calibration, plus a
    histogram of the predictions."""
    y, p = _as_arrays(y, p)
    series = [(labels[0], p, "C3")]
    if p_after is not None:
        series.append((labels[1], np.asarray(p_after, dtype=np.float64).reshape(-1), "C0"))
    fig = _figure((5.5, 6.5))
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(gs[0])
    axh = fig.add_subplot(gs[1], sharex=ax)
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if y.size == 0:
        _note(ax, "no samples")
    for name, probs, color in series:
        if probs.size != y.size or y.size == 0:
            continue
        bins = M.reliability_bins(y, probs, n_bins)
        ece = M.expected_calibration_error(y, probs, n_bins)
        filled = bins["count"] > 0
        ax.plot(bins["mean_pred"][filled], bins["frac_pos"][filled], marker="o", color=color,
                lw=1.5, label=f"{name} (ECE = {_fmt(ece)})")
        axh.hist(probs, bins=edges, color=color, alpha=0.45, label=name)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_ylabel("Observed fraction malignant")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, loc="upper left", fontsize=8)
    ax.tick_params(labelbottom=False)
    axh.set_xlabel("Predicted probability of malignancy")
    axh.set_ylabel("count")
    axh.grid(alpha=0.3)
    return _save(fig, path)


def plot_score_histograms(
    y: Any,
    p: Any,
    path: str | Path,
    thresholds: Mapping[str, float] | None = None,
    *,
    bins: int = 40,
    title: str = "Score distribution by true class",
) -> Path:
    """Histograms (density) of the score for benign and malignant cases, with named thresholds
    as vertical lines."""
    y, p = _as_arrays(y, p)
    fig = _figure((6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = (0.0, 1.0) if p.size == 0 or (p.min() >= 0 and p.max() <= 1) else (p.min(), p.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    for cls, color in ((0, "C0"), (1, "C3")):
        vals = p[y == cls]
        if vals.size:
            ax.hist(vals, bins=edges, density=True, alpha=0.5, color=color,
                    label=f"{CLASS_LABELS[cls]} (n={vals.size})")
    if p.size == 0:
        _note(ax, "no samples")
    for i, (name, thr) in enumerate((thresholds or {}).items()):
        if thr is None or not math.isfinite(float(thr)):
            continue
        ax.axvline(float(thr), color=_LINE_COLORS[i % len(_LINE_COLORS)], ls="--", lw=1.5,
                   label=f"{name} = {float(thr):.3g}")
    ax.set_xlabel("Predicted probability of malignancy")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
    return _save(fig, path)


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Loss (train/val), validation AUC and learning rate against the global epoch.

    ``history`` rows carry ``epoch``, ``phase``, ``train_loss``, ``val_loss``, ``val_auc``,
    ``lr`` (missing or ``None`` values leave gaps). Rows are taken in order; the global epoch is
    the row's position (1-based), so per-phase epoch counters may restart. Each change of
    ``phase`` is marked with a vertical line and the phase name.
    """
    rows = list(history)
    fig = _figure((7.0, 7.5))
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": (3, 2, 1.3)})
    ax_loss, ax_auc, ax_lr = axes
    if not rows:
        _note(ax_loss, "no training history")
        return _save(fig, path)
    x = np.arange(1, len(rows) + 1)
    keys = ("train_loss", "val_loss", "val_auc", "lr")
    col = {k: np.array([_num(r.get(k)) for r in rows]) for k in keys}
    ax_loss.plot(x, col["train_loss"], marker=".", label="train loss")
    ax_loss.plot(x, col["val_loss"], marker=".", label="val loss")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Training history", pad=14)
    ax_auc.plot(x, col["val_auc"], marker=".", color="C2", label="val AUC")
    if np.isfinite(col["val_auc"]).any():
        best = int(np.nanargmax(col["val_auc"]))
        ax_auc.plot([x[best]], [col["val_auc"][best]], marker="*", ms=12, color="C3", ls="none",
                    label=f"best {col['val_auc'][best]:.3f} (epoch {x[best]})")
    ax_auc.set_ylabel("val ROC AUC")
    ax_lr.plot(x, col["lr"], marker=".", color="C4", drawstyle="steps-mid")
    lr_ok = col["lr"][np.isfinite(col["lr"])]
    if lr_ok.size and np.all(lr_ok > 0):
        ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch (global)")

    phases = [str(r.get("phase", "")) for r in rows]
    starts = [0] + [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    for k, s in enumerate(starts):
        for ax in axes:
            if k > 0:
                ax.axvline(s + 0.5, color="0.4", ls="--", lw=1)
        if phases[s]:
            ax_loss.text(s + 0.6, 1.0, phases[s], transform=ax_loss.get_xaxis_transform(),
                         ha="left", va="bottom", fontsize=8, color="0.3")
    for ax in axes:
        ax.grid(alpha=0.3)
    _legend(ax_loss, fontsize=8)
    _legend(ax_auc, fontsize=8, loc="lower right")
    return _save(fig, path)
