"""Pack the training images and the offline backbone weights small enough to travel to a GPU
machine that cannot download anything (the `device` tool carries at most 64 MiB per call,
repository included).

The images keep their folder names and file names (re-encoded as smaller JPEGs), and the packed
folder gets a split.csv: the rows of `configs/splits/default.csv` for the images it holds. The
budget is what the 64 MiB leave once the repository's own files (the shipped model alone is 39 MB)
and the float16 backbone weights are counted; the JPEG quality is the highest that fits it, on
images scaled down only when even quality 30 does not. The packed total is checked after writing.

    python benchmarks/gpu_recipe/pack.py --out .device-data
    # then, on the GPU machine, carrying .device-data (git-ignored, so name it in `carry`):
    #   DATA=.device-data bash benchmarks/gpu_recipe/run.sh

All 12,165 images fit one call only at 70 % size and quality 30 (the repository leaves ~14 MiB). For full
size, pack shards and carry one per call: a folder a call does not name stays on the machine while it is
held, and run.sh merges `DATA.shard-*` into DATA (weights in shard 1; labels and split in every shard):

    for k in 1 2 3; do python benchmarks/gpu_recipe/pack.py --shard $k/3 --out .device-data.shard-$k; done
    # device calls: carry .device-data.shard-1 (command: true), then shard-2, then shard-3 with run.sh
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


CARRY_LIMIT = 64 * 2**20  # the device tool's limit per call, repository included
MARKER = ".gpu-pack"  # in a folder this script wrote, which it may replace


def _encode(path: Path, quality: int, scale: float = 1.0) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as img:
        img = img.convert("RGB")
        if scale < 1.0:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
        img.save(buf, "JPEG", quality=quality, optimize=True, subsampling=2)
    return buf.getvalue()


def travelling_bytes(root: Path) -> int:
    """Size of what the device tool copies besides the carried folder: tracked files and untracked ones git
    does not ignore."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode("utf-8", "surrogateescape")).stat().st_size
               for name in listed if name and (root / name.decode("utf-8", "surrogateescape")).is_file())


def _images(source: Path) -> list[Path]:
    return sorted(p for p in source.rglob("*.jpg") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding ham10000/ and isic2017/")
    ap.add_argument("--sets", default="ham10000,isic2017")
    ap.add_argument("--out", type=Path, default=ROOT / ".device-data")
    ap.add_argument("--budget-mb", type=float, default=None,
                    help="size budget for the images (MiB; default: 64 MiB less the repository, the weights and 1 MiB)")
    ap.add_argument("--backbone", default="tf_efficientnet_lite2")
    ap.add_argument("--limit", type=int, default=0, help="first N images per set (smoke runs)")
    ap.add_argument("--shard", default="1/1", help="K/N: every N-th image from the K-th, one device call each")
    args = ap.parse_args(argv)

    sets = [s for s in args.sets.split(",") if s]
    files = {s: _images(args.data / s) for s in sets}
    if not all(files.values()):
        print(f"error: no images under {args.data}/{{{args.sets}}}", file=sys.stderr)
        return 2
    if args.limit:
        files = {s: f[:: max(1, len(f) // args.limit)][: args.limit] for s, f in files.items()}
    try:
        k, n_shards = (int(x) for x in args.shard.split("/"))
        assert 1 <= k <= n_shards
    except (ValueError, AssertionError):
        print(f"error: --shard {args.shard}: accepted K/N with 1 <= K <= N", file=sys.stderr)
        return 2
    selected = files  # labels and split describe every selected image, whichever shard carries it
    files = {s: f[k - 1 :: n_shards] for s, f in files.items()}
    everything = [p for f in files.values() for p in f]
    if args.out.exists() and any(args.out.iterdir()) and not (args.out / MARKER).is_file():
        print(f"error: {args.out} exists and was not written by this script; accepted: a new folder or an "
              "earlier pack", file=sys.stderr)
        return 2

    import torch
    from safetensors.torch import save_file

    from melanoma_detector.models.factory import create_model

    model = create_model(args.backbone, pretrained=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.backbone.state_dict().items()}
    import tempfile

    # outside the repository, whose travelling size is measured next
    weights_buf = Path(tempfile.mkdtemp(prefix="pack-weights-")) / f"{args.backbone}.safetensors"
    save_file(state, str(weights_buf))
    # counted in every shard's budget, so that all shards choose the same quality and size
    weights_size = weights_buf.stat().st_size
    if k > 1:  # the first shard carries them
        weights_buf.unlink()
    if args.budget_mb is not None:
        budget = args.budget_mb * 2**20
    else:
        budget = CARRY_LIMIT - travelling_bytes(ROOT) - weights_size - 2**20
        print(f"budget for images: {budget / 2**20:.1f} MiB (64 MiB less the repository and "
              f"{weights_size / 2**20:.1f} MiB of weights)")
    # One quality and size for every shard: chosen on the whole selection against the shards' budgets.
    whole = [p for f in selected.values() for p in f]
    sample = whole[:: max(1, len(whole) // 300)]
    choice = None
    for scale in (1.0, 0.9, 0.8, 0.7, 0.6):  # smaller images only when quality 30 does not fit
        for q in range(90, 29, -5):
            est = sum(len(_encode(p, q, scale)) for p in sample) / len(sample) * len(whole) / n_shards
            if est <= 0.97 * budget:  # a margin for the estimate's error
                choice = (scale, q, est)
                break
        if choice:
            break
    if choice is None:
        weights_buf.unlink(missing_ok=True)
        print(f"error: {len(everything)} images do not fit {budget / 2**20:.1f} MiB even at 60 % size and "
              "JPEG quality 30; pack fewer (--limit, --sets) or shard them over several calls", file=sys.stderr)
        return 2
    scale, quality, est = choice
    print(f"{len(everything)} images, JPEG quality {quality}, {scale:.0%} size (estimated {est / 2**20:.1f} MiB)")

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    (args.out / MARKER).write_text("written by benchmarks/gpu_recipe/pack.py\n")
    total = 0
    for s, paths in files.items():
        for src in paths:
            dst = args.out / s / src.relative_to(args.data / s)
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = _encode(src, quality, scale)
            dst.write_bytes(data)
            total += len(data)
        stems = {p.stem for p in selected[s]}
        for table in (args.data / s).glob("*.csv"):
            # Keep the rows of the selected images only (all of them unless --limit).
            with table.open(newline="") as fh:
                reader = csv.DictReader(fh)
                kept = [r for r in reader if r.get("image_id", "") in stems or "image_id" not in r]
            with (args.out / s / table.name).open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=reader.fieldnames)
                w.writeheader()
                w.writerows(kept)
    print(f"images: {total / 2**20:.1f} MiB in {args.out}")
    if k == 1:
        weights = args.out / f"{args.backbone}.safetensors"
        shutil.move(str(weights_buf), weights)
        print(f"weights: {weights} ({weights_size / 2**20:.1f} MiB, float16)")

    # The committed split's rows for the packed images, so that a --limit pack trains on its own split.
    keys = {f"{s}/{src.relative_to(args.data / s).as_posix()}" for s, paths in selected.items() for src in paths}
    with (ROOT / "configs" / "splits" / "default.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["key"] in keys]
    with (args.out / "split.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=reader.fieldnames)
        w.writeheader()
        w.writerows(rows)
    packed = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    limit = budget + weights_size + 2**20
    print(f"packed: {packed / 2**20:.1f} MiB ({len(rows)} split rows); allowed {limit / 2**20:.1f} MiB")
    if packed > limit:
        print(f"error: the pack ({packed / 2**20:.1f} MiB) is over its budget; rerun with a lower --budget-mb",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
