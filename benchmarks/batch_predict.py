"""Batch prediction throughput and main-process memory: `predict_to_file` (what `melanoma predict
--out` runs) over a folder of N images with 0 (in-process), 1 and 2 decode worker processes.

    python benchmarks/batch_predict.py [--data FOLDER] [-n 2000] [--size WxH] [--workers 0 1 2] [--threads 2]
                                       [--batch-size 16] [--bundle models/default] [--format csv]

Without --data, N images are copied from ../shared/data/ham10000 (real dermoscopy, 200x150 JPEG;
mirrored re-encodes when N exceeds the set) into a temporary folder, or generated when that set
is absent. Each setting runs in a fresh process, so its peak RSS (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"

RUN = r"""
import json, sys
from melanoma_detector.inference import Predictor
from melanoma_detector.inference.batch import iter_inputs, predict_to_file
bundle, data, out, workers, threads, batch = sys.argv[1:7]
def hwm_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
n = sum(1 for _ in iter_inputs([data]))
early = {}
def paths():  # peak RSS once a tenth of the images are in: flat to the end when memory is bounded
    for i, path in enumerate(iter_inputs([data])):
        if i == n // 10:
            early["mb"] = hwm_mb()
        yield path
p = Predictor(bundle, threads=int(threads))
s = predict_to_file(p, paths(), out, workers=int(workers), batch_size=int(batch))
s["peak_rss_mb"], s["early_rss_mb"] = hwm_mb(), early.get("mb", float("nan"))
s["torch_imported"] = "torch" in sys.modules
print(json.dumps(s))
"""


def build_images(dest: Path, n: int, size: tuple[int, int] | None) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    sources = sorted(HAM.rglob("*.jpg"), key=lambda p: p.name) if HAM.is_dir() else []  # classes interleaved
    if sources:
        for i in range(n):
            src = sources[i % len(sources)]
            target = dest / f"{i:06d}_{src.name}"
            if i < len(sources) and size is None:
                shutil.copy(src, target)
            else:  # mirrored past the end of the set: a distinct file, never a second decode of the same one
                img = Image.open(src)
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i >= len(sources) else img
                img = img.resize(size, Image.Resampling.BICUBIC) if size else img
                img.save(target, quality=90)
        shape = f"re-encoded at {size[0]}x{size[1]}" if size else "200x150"
        return f"{n} images from {HAM} ({shape} JPEG)"
    rng = np.random.default_rng(0)
    w, h = size or (200, 150)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        skin = np.array([224, 180, 150]) + rng.normal(0, 6, (h, w, 3))
        r = rng.uniform(20, 50)
        mask = np.hypot(xx - w / 2 - rng.normal(0, 8), yy - h / 2 - rng.normal(0, 8)) < r
        img = np.where(mask[..., None], np.array([90, 55, 40]) + rng.normal(0, 10, (h, w, 3)), skin)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(dest / f"{i:06d}.jpg", quality=90)
    return f"{n} synthetic {w}x{h} JPEG images ({HAM} not found)"


def run_setting(bundle: Path, data: Path, out: Path, workers: int, threads: int, batch: int) -> dict:
    r = subprocess.run([sys.executable, "-c", RUN, str(bundle), str(data), str(out), str(workers), str(threads),
                        str(batch)], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"workers={workers} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="an existing image folder (default: build one with -n images)")
    ap.add_argument("-n", type=int, default=2000, help="images to build when --data is not given (default 2000)")
    ap.add_argument("--size", metavar="WxH", help="re-encode the built images at this size, e.g. 1024x768 "
                    "(full-resolution dermoscopy costs far more to decode than the stored 200x150)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--format", choices=["csv", "parquet"], default="csv")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        tmp = Path(tmp)
        if args.data:
            data, what = args.data, f"images under {args.data}"
        else:
            data = tmp / "images"
            size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
            what = build_images(data, args.n, size)
        rows = []
        for w in args.workers:
            out = tmp / f"results-w{w}.{args.format}"
            rows.append(run_setting(args.bundle, data, out, w, args.threads, args.batch_size))
            print(f"workers={w}: {rows[-1]['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{what}; {args.format} output; batch {args.batch_size}; ONNX Runtime {args.threads} threads; "
          f"{os.cpu_count()} CPUs; load average after {load:.2f}")
    print()
    print("| decode workers | images | ok / cannot assess | seconds | images/s | main-process peak RSS (MB): "
          "after 10% / at the end |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = "0 (in-process)" if r["workers"] == 0 else str(r["workers"])
        print(f"| {label} | {r['processed']} | {r['ok']} / {r['cannot_assess']} | {r['seconds']:.1f} | "
              f"{r['images_per_s']:.1f} | {r['early_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} |")
    print()
    print(f"torch imported by any run: {any(r['torch_imported'] for r in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
