"""Report figures beyond :mod:`plots`: the error gallery and the two-model ROC overlay.

Same conventions as :mod:`plots` (matplotlib object API on the Agg canvas, no pyplot, one PNG
per call, the path returned, degenerate input gives a note instead of an exception).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_detector.evaluation import metrics as M
from melanoma_detector.evaluation.plots import _MARKERS, _figure, _fmt, _note, _save, finish_roc, roc_point

__all__ = ["plot_error_gallery", "plot_roc_compare", "select_errors"]

THUMB = 160


def select_errors(y: Sequence[int], p: Sequence[float], threshold: float, k: int = 8
                  ) -> tuple[list[int], list[int]]:
    """Indices of the ``k`` most confident false negatives (malignant, lowest probability below
    ``threshold``) and false positives (benign, highest probability at or above it)."""
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(p, dtype=np.float64)
    fn = np.flatnonzero((y == 1) & (p < threshold))
    fp = np.flatnonzero((y == 0) & (p >= threshold))
    fn = fn[np.argsort(p[fn], kind="mergesort")][:k]
    fp = fp[np.argsort(-p[fp], kind="mergesort")][:k]
    return fn.tolist(), fp.tolist()


def _thumb(path: str) -> np.ndarray | None:
    from melanoma_detector.data.io import load_image

    try:
        img = load_image(path)
    except Exception:  # an unreadable file must not break the report
        return None
    img.thumbnail((THUMB, THUMB))
    return np.asarray(img)


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_error_gallery(
    false_negatives: Sequence[tuple[str, float]],
    false_positives: Sequence[tuple[str, float]],
    path: str | Path,
    *,
    threshold: float,
    ncols: int = 4,
    title: str = "Most confident errors",
) -> Path:
    """A grid of thumbnails: the most confident false negatives, then false positives, each with
    its file name and predicted probability of malignancy. ``(path, probability)`` pairs."""
    sections = [("False negatives: malignant, scored below the threshold", false_negatives, "C3"),
                ("False positives: benign, scored at or above the threshold", false_positives, "C0")]
    rows_per = [max(1, math.ceil(len(items) / ncols)) for _, items, _ in sections]
    heights = [1.0 if items else 0.25 for _, items, _ in sections for _ in range(
        max(1, math.ceil(len(items) / ncols)))]
    fig = _figure((2.3 * ncols, 0.6 + 2.3 * sum(heights)))
    fig.suptitle(f"{title} at threshold {threshold:.3g}", fontsize=12)
    gs = fig.add_gridspec(sum(rows_per), ncols, hspace=0.45, wspace=0.08, height_ratios=heights)
    row0 = 0
    for (label, items, colour), nrows in zip(sections, rows_per):
        if not items:
            ax = fig.add_subplot(gs[row0, :])
            ax.set_axis_off()
            ax.set_title(label, fontsize=10, color=colour, loc="left")
            _note(ax, "none")
        for i, (img_path, prob) in enumerate(items):
            ax = fig.add_subplot(gs[row0 + i // ncols, i % ncols])
            thumb = _thumb(img_path)
            if thumb is None:
                _note(ax, "unreadable")
            else:
                ax.imshow(thumb)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2)
            ax.set_xlabel(f"{_short(Path(img_path).name)}\np = {prob:.3f}", fontsize=8)
            if i == 0:
                ax.set_title(label, fontsize=10, color=colour, loc="left")
        row0 += nrows
    return _save(fig, path)


def plot_roc_compare(
    y: Any,
    curves: Mapping[str, Any],
    path: str | Path,
    operating_points: Mapping[str, Mapping[str, float]] | None = None,
    *,
    title: str = "ROC curves, same images",
) -> Path:
    """ROC curves of several models scored on the same images (``{name: scores}``), with AUC in
    the legend and each model's named operating points ``{model: {name: threshold}}``."""
    y = np.asarray(y).reshape(-1).astype(np.int64)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    for i, (name, scores) in enumerate(curves.items()):
        p = np.asarray(scores, dtype=np.float64).reshape(-1)
        colour = f"C{(0, 1, 2, 4)[i % 4]}"
        try:
            fpr, tpr, _ = M.roc_curve_points(y, p, drop_intermediate=False)
        except ValueError as exc:
            _note(ax, f"ROC undefined: {exc}")
            break
        ax.plot(fpr, tpr, lw=2, color=colour, label=f"{name} (AUC = {_fmt(M.roc_auc(y, p))})")
        for j, (op, thr) in enumerate(((operating_points or {}).get(name) or {}).items()):
            if thr is None or not math.isfinite(float(thr)):
                continue
            x_pt, y_pt = roc_point(y, p, float(thr))
            ax.plot([x_pt], [y_pt], ls="none", marker=_MARKERS[j % len(_MARKERS)], ms=8,
                    color=colour, markeredgecolor="k", label=f"{name} {op} (t={float(thr):.3g})")
    return finish_roc(fig, ax, path, title=title, fontsize=7)
