"""How the input gate's fitting rule trades refusing non-dermoscopy against refusing dermoscopy from devices
it never saw.

    python benchmarks/gate_study.py [--bundle models/default] [--split configs/splits/default.csv]

Gate features come from the bundle's graph (so the bundle's own gate is not used: each rule is fitted here).
Two rules are compared: the rule before 2026-12-01 (validation images only, Ledoit-Wolf covariance, 0.99
quantile) and the current one (`melanoma_detector.export.gate`: each validation image also as acquisition
variants, covariance shrunk half way to the identity, 0.995 quantile). Three tables of refused shares:

1. leave one source out: fitted on one collection's images, refusing how much of the other (a device the gate
   never saw, as a user's own images are) and of natural photos;
2. fitted as a bundle is (HAM10000 + ISIC 2017 validation): HAM10000 test images under acquisition shifts
   (the shifts of `benchmarks/acquisition_shift.py`, plus a 4x upscale as a full-size original and a squash to
   300x300 as in the Kaggle set) and natural photos.

The natural photos are the 25 that ship with scikit-image / scikit-learn and 4 random crops (30-70 % of each
side) of each. Features are cached in --cache (keyed by the graph's sha256), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from acquisition_shift import SHIFTS  # noqa: E402
from input_gate import natural_images  # noqa: E402

EXTRA_SHIFTS = {
    "upscaled 4x (a full-size original)": lambda img: img.resize((img.width * 4, img.height * 4),
                                                                 Image.Resampling.BICUBIC),
    "squashed to 300x300 (the Kaggle set)": lambda img: img.resize((300, 300), Image.Resampling.BICUBIC),
}


def natural_crops(images: list[Image.Image], per_image: int = 4, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        w, h = img.size
        for _ in range(per_image):
            s = rng.uniform(0.3, 0.7)
            cw, ch = max(1, int(w * s)), max(1, int(h * s))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append(img.crop((x, y, x + cw, y + ch)))
    return out


def compute(pred, split_rows, data_root: Path, *, variants: int, shift_limit: int,
            limit: int = 0) -> dict[str, np.ndarray]:
    from melanoma_detector.data.io import load_image
    from melanoma_detector.export.gate import gate_features

    def rows(prefix, split):
        paths = [str(data_root / r["key"]) for r in split_rows if r["key"].startswith(prefix) and r["split"] in split]
        return paths[:limit] if limit else paths

    feats: dict[str, np.ndarray] = {}
    for name, paths, k in (("ham_val", rows("ham10000/", ("val",)), variants),
                           ("isic", rows("isic2017/", ("train", "val")), variants),
                           ("isic_val", rows("isic2017/", ("val",)), variants),
                           ("ham_test", rows("ham10000/", ("test",)), 0)):
        feats[name], feats[f"{name}_owner"] = gate_features(pred, paths, variants=k, progress=True, desc=name)
        print(f"  {name}: {len(paths)} images", file=sys.stderr, flush=True)
    test_imgs = [load_image(p) for p in rows("ham10000/", ("test",))[:shift_limit]]
    shifts = {k: v for k, v in {**SHIFTS, **EXTRA_SHIFTS}.items() if k != "none"}
    for i, (name, shift) in enumerate(shifts.items()):
        feats[f"shift{i}"], _ = gate_features(pred, [shift(im) for im in test_imgs], desc=name)
    feats["shift_names"] = np.array(list(shifts))
    nat = [img.convert("RGB") for _, img in natural_images()]
    feats["natural"], _ = gate_features(pred, nat)
    feats["natural_crops"], _ = gate_features(pred, natural_crops(nat))
    return feats


def refused(ood: dict, x: np.ndarray) -> float:
    from melanoma_detector.export.gate import mahalanobis

    return float((mahalanobis(x, ood) > ood["threshold"]).mean())


def originals(f: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The unvaried rows of a set computed with acquisition variants (the first row of each image)."""
    owner = f[f"{name}_owner"]
    first = np.r_[True, owner[1:] != owner[:-1]]
    return f[name][first]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--split", type=Path, default=ROOT / "configs" / "splits" / "default.csv")
    ap.add_argument("--data-root", type=Path, default=SHARED)
    ap.add_argument("--shift-limit", type=int, default=400, help="HAM10000 test images per acquisition shift")
    ap.add_argument("--limit", type=int, default=0, help="first N images of each set (0: all; for a smoke run)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "gate_study")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not args.data_root.is_dir():
        print(f"error: {args.data_root} not found: this benchmark needs the shared HAM10000 / ISIC 2017 images",
              file=sys.stderr)
        return 2
    from melanoma_detector.export.gate import ACQUISITION_VARIANTS, QUANTILE, SHRINKAGE, fit_ood
    from melanoma_detector.inference import Predictor

    pred = Predictor(args.bundle, threads=args.threads)
    k = ACQUISITION_VARIANTS
    cache = args.cache / f"features-{pred.bundle.metadata['graph']['sha256'][:12]}-k{k}-n{args.shift_limit}-l{args.limit}.npz"
    if cache.is_file():
        f = dict(np.load(cache, allow_pickle=False))
    else:
        f = compute(pred, list(csv.DictReader(args.split.open())), args.data_root, variants=k,
                    shift_limit=args.shift_limit, limit=args.limit)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **f)

    def rules(name: str):
        """(label, gate) for the old and the current rule, fitted on set `name` (or a concatenation)."""
        names = name.split("+")
        old = fit_ood(np.concatenate([originals(f, n) for n in names]), shrinkage="ledoit-wolf", quantile=0.99)
        owners = np.concatenate([f[f"{n}_owner"] + 100_000 * j for j, n in enumerate(names)])
        new = fit_ood(np.concatenate([f[n] for n in names]), owners, variants=k)
        return [("before 2026-12-01: val only, Ledoit-Wolf, q 0.99", old),
                (f"current: val + {k} variants, shrinkage {SHRINKAGE}, q {QUANTILE}", new)]

    natural = {"natural photos (25)": f["natural"], "crops of them (100)": f["natural_crops"]}
    print(f"bundle {args.bundle} ({pred.bundle.version}); refused share of each set\n")
    print("Leave one source out (the held-out collection stands for a device the gate never saw):\n")
    for fit_name, fit_label, evals in (
        ("ham_val", "HAM10000 val", {"HAM10000 test": f["ham_test"], "ISIC 2017 train+val (unseen)": originals(f, "isic")}),
        ("isic", "ISIC 2017 train+val", {"HAM10000 test (unseen)": f["ham_test"]}),
    ):
        cols = {**evals, **natural}
        print(f"| gate fitted on {fit_label}: rule | " + " | ".join(cols) + " |")
        print("|---|" + "---|" * len(cols))
        for label, ood in rules(fit_name):
            print(f"| {label} | " + " | ".join(f"{refused(ood, x):.1%}" for x in cols.values()) + " |")
        print()
    shifts = {str(n): f[f"shift{i}"] for i, n in enumerate(f["shift_names"])}
    print(f"Fitted as a bundle is (HAM10000 + ISIC 2017 validation); HAM10000 test ({len(f['ham_test'])} images, "
          f"the first {len(next(iter(shifts.values())))} under each shift) and natural photos:\n")
    cols = {"HAM10000 test": f["ham_test"], **shifts, **natural}
    print("| rule | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, ood in rules("ham_val+isic_val"):
        print(f"| {label} | " + " | ".join(f"{refused(ood, x):.1%}" for x in cols.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
