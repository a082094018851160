"""How the input gate behaves: natural non-skin photos shipped by packages (scikit-image,
scikit-learn) should be refused; dermoscopic test images should not.

    python benchmarks/input_gate.py [--bundle models/default] [--split configs/splits/default.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SKIMAGE = [
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
    "checkerboard", "logo", "binary_blobs", "horse", "shepp_logan_phantom",
]


def natural_images() -> list[tuple[str, Image.Image]]:
    """Non-dermoscopy images that ship inside packages (no download)."""
    from skimage import data, img_as_ubyte

    out = []
    for name in SKIMAGE:
        arr = getattr(data, name)()
        if arr.dtype != np.uint8:
            arr = img_as_ubyte(arr.astype(float) / max(float(arr.max()), 1e-9))
        out.append((f"skimage.{name}", Image.fromarray(arr)))
    try:
        from sklearn.datasets import load_sample_images

        for fname, arr in zip(load_sample_images().filenames, load_sample_images().images):
            out.append((f"sklearn.{Path(fname).name}", Image.fromarray(arr)))
    except ImportError:
        pass
    return out


def gate_reason(result: dict) -> str:
    r = result["reason"]
    if result["status"] == "ok":
        return "accepted"
    if "does not look like" in r:
        return "refused: out of distribution"
    if "uniform" in r:
        return "refused: near-uniform"
    if "px" in r:
        return "refused: too small"
    return "refused: other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--split", type=Path, default=ROOT / "configs" / "splits" / "default.csv")
    args = ap.parse_args(argv)
    from melanoma_detector.inference import Predictor

    pred = Predictor(args.bundle)
    nat = natural_images()
    rows = [(name, pred.predict(img, name=name)) for name, img in nat]
    refused = [r for _, r in rows if r["status"] != "ok"]
    print(f"natural non-skin images: {len(refused)}/{len(rows)} refused ({len(refused) / len(rows):.1%})")
    for name, r in rows:
        print(f"  {name:<36} {gate_reason(r)}")
    if not SHARED.is_dir():
        print(f"{SHARED} absent: dermoscopy refusal rate not measured", file=sys.stderr)
        return 0
    split = list(csv.DictReader(args.split.open()))
    for label, keep in (("HAM10000 test split", lambda k, s: k.startswith("ham10000/") and s == "test"),
                        ("ISIC 2017 val", lambda k, s: k.startswith("isic2017/") and s == "val")):
        paths = [str(SHARED / r["key"]) for r in split if keep(r["key"], r["split"])]
        res = pred.predict_paths(paths, batch_size=32)
        counts = Counter(gate_reason(r) for r in res)
        n_ref = sum(v for k, v in counts.items() if k != "accepted")
        print(f"{label}: {n_ref}/{len(res)} refused ({n_ref / len(res):.2%}); {dict(counts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
