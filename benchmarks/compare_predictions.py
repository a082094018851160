"""Paired comparison of two `melanoma evaluate` runs from their predictions.csv files: per set, the
images both runs assessed, each run's ROC AUC and DeLong's test of the difference (A minus B).

For two runs that `--compare` cannot pair, for instance the same bundle with and without `--tta`:

    melanoma evaluate --data ... --out runs/plain
    melanoma evaluate --data ... --tta --out runs/tta
    python benchmarks/compare_predictions.py runs/tta runs/plain
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from melanoma_detector.evaluation.metrics import delong_test


def read_predictions(run: Path) -> dict[tuple[str, str], tuple[int, float]]:
    """(set, path) -> (label, probability) for every assessed image of an evaluation folder."""
    path = run / "predictions.csv" if run.is_dir() else run
    if not path.is_file():
        sys.exit(f"error: {path}: not found; give an evaluation folder (melanoma evaluate --out) "
                 "or its predictions.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"path", "label", "probability_malignant", "set"} <= set(rows[0]):
        sys.exit(f"error: {path}: expected the columns path, label, probability_malignant, set")
    # the group (lesion) column of evaluate's predictions.csv, or the image itself where the data named none
    return {(r["set"], r["path"]): (int(r["label"] == "malignant"), float(r["probability_malignant"]),
                                    r.get("group") or r["path"]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="evaluation folder (or predictions.csv) A")
    ap.add_argument("b", type=Path, help="evaluation folder (or predictions.csv) B")
    args = ap.parse_args()
    a, b = read_predictions(args.a), read_predictions(args.b)
    both = sorted(a.keys() & b.keys())
    if not both:
        sys.exit("error: the two runs share no assessed image (same --data and split?)")
    print(f"A = {args.a}, B = {args.b}; images both assessed: {len(both)} (A only {len(a) - len(both)}, "
          f"B only {len(b) - len(both)})")
    for name in sorted({s for s, _ in both}):
        keys = [k for k in both if k[0] == name]
        if any(a[k][0] != b[k][0] for k in keys):
            sys.exit(f"error: set {name}: the two runs disagree on labels; not the same data")
        y = np.array([a[k][0] for k in keys])
        if len(set(y)) < 2:
            print(f"{name}: n={len(keys)}, one class only: no AUC")
            continue
        groups = np.array([a[k][2] for k in keys], dtype=object)  # one lesion's images are not independent
        d = delong_test(y, np.array([a[k][1] for k in keys]), np.array([b[k][1] for k in keys]), groups=groups)
        p = "n/a" if d["p_value"] is None else "< 0.001" if d["p_value"] < 0.001 else f"{d['p_value']:.3f}"
        print(f"{name}: n={len(keys)} ({int(y.sum())} malignant); AUC A {d['auc1']:.4f}, B {d['auc2']:.4f}; "
              f"A - B {d['diff']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f}), DeLong p = {p} "
              f"(clustered by {d.get('n_groups')} lesion groups)")


if __name__ == "__main__":
    main()
