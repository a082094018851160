"""`melanoma evaluate`: score a labelled set with a model and write metrics, curves and
per-image predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_detector.data.discovery import Sample, discover, require_both_classes
from melanoma_detector.errors import DataError


def evaluation_samples(path: str | Path) -> list[Sample]:
    """A folder of class subfolders, a root whose test/ holds them, or a manifest.

    With split folders or a split column, the test split is used (val when there is no test).
    """
    src = discover(path)
    splits = {s.split for s in src.samples}
    if splits == {None}:
        chosen = src.samples
    else:
        name = "test" if "test" in splits else "val" if "val" in splits else None
        if name is None:
            raise DataError(f"{path}: has split folders but no test/ or val/ to evaluate on")
        chosen = [s for s in src.samples if s.split == name]
    if src.non_images:
        raise DataError(f"not an image file in evaluation data: {src.non_images[0]}")
    require_both_classes(chosen, f"evaluation data {path}")
    return chosen


def evaluate_model(
    predictor,
    data: str | Path,
    *,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """`predictor.predict_paths(paths)` -> metrics.json, predictions.csv, roc.png, pr.png,
    confusion.png in `out_dir`."""
    from melanoma_detector.evaluation.metrics import binary_metrics
    from melanoma_detector.evaluation.plots import plot_confusion, plot_pr, plot_roc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = evaluation_samples(data)
    rows = predictor.predict_paths([s.path for s in samples], progress=progress)
    # Images the input gate refuses are reported, not scored: a screening tool answers
    # "cannot assess" for them, so the metrics describe the images it does assess.
    refused = [(s, r) for s, r in zip(samples, rows) if r["status"] != "ok"]
    kept = [(s, r) for s, r in zip(samples, rows) if r["status"] == "ok"]
    if not kept:
        raise DataError(f"cannot evaluate: no image could be scored, first reason: {rows[0]['reason']}")
    samples, rows = [s for s, _ in kept], [r for _, r in kept]
    require_both_classes(samples, f"assessable images of {data}")
    y = np.array([s.label for s in samples])
    p = np.array([r["probability_malignant"] for r in rows], dtype=np.float64)
    threshold = predictor.threshold
    metrics = binary_metrics(y, p, threshold=threshold)
    metrics["data"] = str(data)
    metrics["n_cannot_assess"] = len(refused)
    metrics["cannot_assess"] = [{"path": s.path, "reason": r["reason"]} for s, r in refused[:100]]
    with (out / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "probability_malignant", "predicted_label"])
        for s, r in zip(samples, rows):
            w.writerow([s.path, "malignant" if s.label else "benign", f"{r['probability_malignant']:.6f}", r["predicted_label"]])
    plot_roc(y, p, out / "roc.png", operating_points={"screening": threshold})
    plot_pr(y, p, out / "pr.png")
    plot_confusion(metrics["confusion"], out / "confusion.png", title=f"threshold {threshold:.3f}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
