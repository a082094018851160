"""Robustness to acquisition shifts: how much one or more model bundles lose when the same test
images look as if taken with another dermatoscope (colour cast, exposure, blur, JPEG).

    python benchmarks/acquisition_shift.py --bundle models/default OTHER_BUNDLE [--limit N]

Each shift is applied to the decoded image, before the bundle's own preprocessing, so every bundle
sees the same shifted pixels. Per bundle, shift and set it prints ROC AUC (calibrated
probabilities, the input gate's refusals ignored so that all bundles score the same images), the
change against the unshifted images, and the mean absolute change of the probability itself: a
model can keep its ranking (AUC) while every probability drifts, which moves images across the
screening threshold.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from melanoma_detector.data.shifts import channel_gains, jpeg_roundtrip

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# Gains of +-15 % per channel are within the white-balance spread of consumer dermatoscopes and
# phone adapters; 0.75 / 1.25 exposure and a 1.5 px blur stand for dim or soft images.
SHIFTS = {
    "none": lambda img: img,
    "warm cast (R x1.15, B x0.85)": lambda img: channel_gains(img, (1.15, 1.0, 0.85)),
    "cool cast (R x0.85, B x1.15)": lambda img: channel_gains(img, (0.85, 1.0, 1.15)),
    "green cast (G x1.15)": lambda img: channel_gains(img, (0.93, 1.15, 0.93)),
    "darker (x0.75)": lambda img: channel_gains(img, (0.75, 0.75, 0.75)),
    "brighter (x1.25)": lambda img: channel_gains(img, (1.25, 1.25, 1.25)),
    "blur (Gaussian, 1.5 px)": lambda img: img.filter(ImageFilter.GaussianBlur(1.5)),
    "JPEG quality 30": lambda img: jpeg_roundtrip(img, 30),
}
SETS = {
    "HAM10000 test": lambda key, split: key.startswith("ham10000/") and split == "test",
    "ISIC 2017 val": lambda key, split: key.startswith("isic2017/") and split == "val",
}


def score(pred, images: list[Image.Image], shift, batch_size: int = 32) -> np.ndarray:
    """Calibrated probabilities of `pred` on the shifted images; NaN where the size/uniformity gate refuses one."""
    from melanoma_detector.inference.predictor import CannotAssess

    prep = pred.image_prep()
    out = np.full(len(images), np.nan)
    for start in range(0, len(images), batch_size):
        arrays, idx = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                arrays.append(prep.prepare(shift(images[i]))[1])
                idx.append(i)
            except CannotAssess as exc:
                print(f"  skipped image {i}: {exc}", file=sys.stderr)
        if arrays:
            out[idx] = pred.calibrate(pred.run(np.stack(arrays))["logit"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, nargs="+", default=[ROOT / "models" / "default"])
    ap.add_argument("--split", type=Path, default=ROOT / "configs" / "splits" / "default.csv")
    ap.add_argument("--data-root", type=Path, default=SHARED)
    ap.add_argument("--limit", type=int, default=0, help="N images per set, both classes in proportion (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.data_root.is_dir():
        print(f"error: {args.data_root} not found: this benchmark needs the shared HAM10000 / ISIC 2017 images",
              file=sys.stderr)
        return 2
    from melanoma_detector.data.io import load_image
    from melanoma_detector.evaluation.metrics import roc_auc
    from melanoma_detector.inference import Predictor

    preds = [Predictor(b, threads=args.threads) for b in args.bundle]
    names = [f"{b} ({p.bundle.metadata.get('model_version', '?')}, colour constancy "
             f"{p.pp.color_constancy})" for b, p in zip(args.bundle, preds)]
    rows = list(csv.DictReader(args.split.open()))
    print("bundles: " + "; ".join(f"[{i}] {n}" for i, n in enumerate(names)))
    for set_name, keep in SETS.items():
        chosen = [r for r in rows if keep(r["key"], r["split"])]
        if args.limit:  # both classes in proportion: the first N rows of a set can all be benign
            mal = [r for r in chosen if r["label"] == "1"]
            ben = [r for r in chosen if r["label"] != "1"]
            k = max(1, round(args.limit * len(mal) / max(1, len(chosen)))) if mal else 0
            chosen = mal[:k] + ben[: max(1, args.limit - k)]
        y = np.asarray([int(r["label"]) for r in chosen])
        images = [load_image(args.data_root / r["key"]) for r in chosen]
        print(f"\n{set_name}: {len(images)} images ({int(y.sum())} melanoma)")
        print("| shift | " + " | ".join(f"[{i}] AUC (change)" for i in range(len(preds)))
              + " | " + " | ".join(f"[{i}] mean abs prob change" for i in range(len(preds))) + " |")
        print("|---|" + "---|" * (2 * len(preds)))
        base: list[np.ndarray] = []
        for shift_name, shift in SHIFTS.items():
            t0 = time.perf_counter()
            probs = [score(p, images, shift) for p in preds]
            if shift_name == "none":
                base = probs
            aucs, drifts = [], []
            for p, b in zip(probs, base):
                ok = ~np.isnan(p) & ~np.isnan(b)
                auc, auc0 = roc_auc(y[ok], p[ok]), roc_auc(y[ok], b[ok])
                aucs.append(f"{auc:.3f}" + ("" if shift_name == "none" else f" ({auc - auc0:+.3f})"))
                drifts.append(f"{np.mean(np.abs(p[ok] - b[ok])):.3f}")
            print(f"| {shift_name} | " + " | ".join(aucs) + " | " + " | ".join(drifts) + " |", flush=True)
            print(f"  {shift_name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
