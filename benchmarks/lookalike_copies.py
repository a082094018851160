"""How well a bundle's fingerprints (seen_images.npz) find copies of its training images, and how often they
take an unseen image for one.

For a random sample of the bundle's training images, each copied in ways collections are built (resized, squashed
to a square, re-encoded, mirrored, brightened, a centred square crop, small and larger crops), prints the share
found as copies and the distance to the nearest stored hash. Then scores every test image of the split, none of
which the model saw, and prints how many are wrongly matched and how close the nearest stored hash comes.

    python benchmarks/lookalike_copies.py --model models/default --data-root ../shared/data \\
        --split-file configs/splits/default.csv --n 200
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from melanoma_detector.data.fingerprints import COPY_BITS, SeenImages
from melanoma_detector.data.io import load_image


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img: Image.Image, keep: float) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * keep), round(h * keep)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _square(img: Image.Image) -> Image.Image:
    s = min(img.size)
    return img.crop(((img.width - s) // 2, (img.height - s) // 2, (img.width - s) // 2 + s, (img.height - s) // 2 + s))


COPIES = {
    "identical pixels, PNG": lambda im: im,
    "squashed to 300x300, JPEG 75": lambda im: _jpeg(im.resize((300, 300), Image.Resampling.BICUBIC), 75),
    "upscaled 3x, JPEG 90": lambda im: _jpeg(im.resize((im.width * 3, im.height * 3), Image.Resampling.BICUBIC), 90),
    "downscaled to 100 px wide, JPEG 90": lambda im: _jpeg(im.resize((100, round(100 * im.height / im.width))), 90),
    "mirrored, JPEG 60": lambda im: _jpeg(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 60),
    "rotated 90 degrees": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "brightness x1.15, JPEG 90": lambda im: _jpeg(ImageEnhance.Brightness(im).enhance(1.15), 90),
    "contrast x1.2, JPEG 90": lambda im: _jpeg(ImageEnhance.Contrast(im).enhance(1.2), 90),
    "gamma 0.8, JPEG 90": lambda im: _jpeg(im.point(lambda v: round(255 * (v / 255) ** 0.8)), 90),
    "centred square crop, 300 px": lambda im: _jpeg(_square(im).resize((300, 300), Image.Resampling.BICUBIC), 90),
    "centred crop keeping 95% per side": lambda im: _jpeg(_crop(im, 0.95), 90),
    "centred crop keeping 90% per side": lambda im: _jpeg(_crop(im, 0.90), 90),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/default"), help="bundle folder with seen_images.npz")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"), help="folder holding the split's keys")
    ap.add_argument("--split-file", type=Path, default=Path("configs/splits/default.csv"))
    ap.add_argument("--n", type=int, default=200, help="training images to copy (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    meta = json.loads((args.model / "metadata.json").read_text())
    info = meta.get("seen_images")
    if not info:
        sys.exit(f"error: {args.model}: the bundle has no fingerprints (seen_images in metadata.json); re-export it")
    seen = SeenImages.load(args.model / info["file"], sha256=info["sha256"])
    if not args.split_file.is_file() or not args.data_root.is_dir():
        sys.exit(f"skipped: needs the split file ({args.split_file}) and the data it names under {args.data_root}")
    with args.split_file.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    rng = np.random.default_rng(args.seed)
    picked = [train[i] for i in rng.choice(len(train), size=min(args.n, len(train)), replace=False)]
    print(f"bundle {meta.get('model_version')}: {seen.counts['train']:,} training and {seen.counts['val']:,} "
          f"validation images fingerprinted; a copy is within {COPY_BITS} of 256 bits")

    originals = [load_image(args.data_root / r["key"]) for r in picked]
    print(f"\n{len(picked)} training images, each copied as below: share found as a training copy, and the nearest "
          "stored hash (bits, median / 95th percentile / max)")
    for name, make in COPIES.items():
        d = np.array([seen.distances(make(img))["train"] for img in originals])
        print(f"  {name:38s} found {np.mean(d <= COPY_BITS):6.1%}   nearest {np.median(d):4.0f} / "
              f"{np.percentile(d, 95):4.0f} / {d.max():4.0f}")

    start = time.perf_counter()
    nearest = np.array([min(seen.distances(load_image(args.data_root / r["key"])).values()) for r in test])
    per_image = (time.perf_counter() - start) / max(1, len(test))
    wrong = int((nearest <= COPY_BITS).sum())
    print(f"\n{len(test):,} test images (never seen): {wrong} wrongly matched ({wrong / max(1, len(test)):.2%}); "
          f"nearest stored hash: min {nearest.min()}, 1st percentile {np.percentile(nearest, 1):.0f}, median "
          f"{np.median(nearest):.0f} bits; {1000 * per_image:.1f} ms per image (decode + hashes + lookup)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
