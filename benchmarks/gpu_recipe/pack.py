"""Pack the training images and the offline backbone weights small enough to travel to a GPU
machine that cannot download anything (the `device` tool carries at most 64 MiB per call,
repository included).

The images keep their folder names and file names (re-encoded as smaller JPEGs), so
`configs/splits/default.csv` applies unchanged; the JPEG quality is the highest that fits the
budget, estimated on a sample. The backbone weights go as float16 safetensors.

    python benchmarks/gpu_recipe/pack.py --out .device-data --budget-mb 30
    # then, on the GPU machine: bash benchmarks/gpu_recipe/run.sh   (DATA=.device-data)
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def _encode(path: Path, quality: int) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True, subsampling=2)
    return buf.getvalue()


def _images(source: Path) -> list[Path]:
    return sorted(p for p in source.rglob("*.jpg") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding ham10000/ and isic2017/")
    ap.add_argument("--sets", default="ham10000,isic2017")
    ap.add_argument("--out", type=Path, default=ROOT / ".device-data")
    ap.add_argument("--budget-mb", type=float, default=30.0, help="size budget for all images (MiB)")
    ap.add_argument("--backbone", default="tf_efficientnet_lite2")
    ap.add_argument("--limit", type=int, default=0, help="first N images per set (smoke runs)")
    args = ap.parse_args(argv)

    sets = [s for s in args.sets.split(",") if s]
    files = {s: _images(args.data / s) for s in sets}
    if not all(files.values()):
        print(f"error: no images under {args.data}/{{{args.sets}}}", file=sys.stderr)
        return 2
    if args.limit:
        files = {s: f[:: max(1, len(f) // args.limit)][: args.limit] for s, f in files.items()}
    everything = [p for f in files.values() for p in f]
    sample = everything[:: max(1, len(everything) // 300)]
    budget = args.budget_mb * 2**20
    quality = 30
    for q in range(90, 29, -5):
        est = sum(len(_encode(p, q)) for p in sample) / len(sample) * len(everything)
        if est <= budget:
            quality = q
            break
    print(f"{len(everything)} images, JPEG quality {quality} (estimated {est / 2**20:.1f} MiB)")

    if args.out.exists():
        shutil.rmtree(args.out)
    total = 0
    for s, paths in files.items():
        for src in paths:
            dst = args.out / s / src.relative_to(args.data / s)
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = _encode(src, quality)
            dst.write_bytes(data)
            total += len(data)
        stems = {p.stem for p in paths}
        for table in (args.data / s).glob("*.csv"):
            # Keep the rows of the packed images only (all of them unless --limit).
            with table.open(newline="") as fh:
                reader = csv.DictReader(fh)
                kept = [r for r in reader if r.get("image_id", "") in stems or "image_id" not in r]
            with (args.out / s / table.name).open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=reader.fieldnames)
                w.writeheader()
                w.writerows(kept)
    print(f"images: {total / 2**20:.1f} MiB in {args.out}")

    import torch
    from safetensors.torch import save_file

    from melanoma_detector.models.factory import create_model

    model = create_model(args.backbone, pretrained=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.backbone.state_dict().items()}
    weights = args.out / f"{args.backbone}.safetensors"
    save_file(state, str(weights))
    print(f"weights: {weights} ({weights.stat().st_size / 2**20:.1f} MiB, float16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
