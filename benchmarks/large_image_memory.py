"""Peak memory of scoring one very large photo with a warm serving Predictor.

    python benchmarks/large_image_memory.py [--bundle models/default] [--size 8000x6000]

The web app accepts uploads of up to 20 MB, which a JPEG of 8000x6000 pixels (48 MP) fits; decoding it
takes 144 MB as RGB. Each case runs in a fresh process: the Predictor is loaded and warmed on a small
image first, then the large one is scored from its path and from its bytes (as an upload arrives), with
and without an EXIF orientation tag (a rotation needs the source and the rotated copy at once). Printed:
the process's peak RSS (VmHWM) before and after, and their difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import io, json, sys, time
from melanoma_detector.inference import Predictor

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

bundle, small, big, how = sys.argv[1:5]
p = Predictor(bundle, threads=2)
p.predict(small)
before = hwm()
t0 = time.perf_counter()
if how == "bytes":
    from melanoma_detector.data.io import load_image
    with open(big, "rb") as fh:
        r = p.predict(load_image(fh.read()))
else:
    r = p.predict(big)
print(json.dumps({"before_mb": before, "after_mb": hwm(), "seconds": time.perf_counter() - t0,
                  "status": r["status"]}))
"""


def make_images(folder: Path, width: int, height: int) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # a smooth picture with noise: JPEG size of a real photo, not of flat colour
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 60 * np.sin(xx / 400 + c) * np.cos(yy / 300 - c) for c in range(3)], axis=-1)
    base += rng.normal(0, 6, base.shape).astype(np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    out = {"plain": folder / "plain.jpg", "rotated": folder / "rotated.jpg", "small": folder / "small.jpg"}
    img.save(out["plain"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    img.save(out["rotated"], quality=90, exif=exif.tobytes())
    img.resize((600, 450)).save(out["small"], quality=90)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(ROOT / "models" / "default"))
    ap.add_argument("--size", default="8000x6000", help="WIDTHxHEIGHT of the generated photo")
    args = ap.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size}: expected WIDTHxHEIGHT, e.g. 8000x6000")
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), width, height)
        mb = images["plain"].stat().st_size / 1e6
        print(f"{width}x{height} JPEG, {mb:.1f} MB; bundle {args.bundle}\n")
        print("| photo | given as | peak RSS before (MB) | after (MB) | increase (MB) | seconds |")
        print("|---|---|---:|---:|---:|---:|")
        for name in ("plain", "rotated"):
            for how in ("path", "bytes"):
                proc = subprocess.run([sys.executable, "-c", CHILD, args.bundle, str(images["small"]),
                                       str(images[name]), how], capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                label = "no EXIF tag" if name == "plain" else "EXIF orientation 6"
                print(f"| {label} | {how} | {r['before_mb']:.0f} | {r['after_mb']:.0f} | "
                      f"{r['after_mb'] - r['before_mb']:.0f} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
