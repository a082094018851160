"""Plain vs cached phase 2 on the same real data, same epochs: seconds per epoch and val AUC.

    python benchmarks/phase2_modes.py [--train 2000] [--val 600] [--epochs 3] [--views 3]

Builds a manifest of a lesion-grouped subset of ../shared/data/ham10000 (train/val taken from the
committed split configs/splits/default.csv), runs phase 1 once (cached features, shared by both
runs), then phase 2 in `plain` mode (on-the-fly augmentation through the whole backbone) and in
`cached` mode (K augmented views of the frozen bottom's output stored on disk), and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAM = ROOT.parent / "shared" / "data" / "ham10000"


def build_manifest(out: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    split = {r["key"]: r for r in csv.DictReader((ROOT / "configs" / "splits" / "default.csv").open())}
    rng = random.Random(seed)
    rows = {"train": [], "val": []}
    for key, r in split.items():
        if key.startswith("ham10000/") and r["split"] in rows:
            rows[r["split"]].append(r)
    picked = []
    for name, n in (("train", n_train), ("val", n_val)):
        pool = rows[name]
        rng.shuffle(pool)
        # Keep the malignant share of the full split: stratified by label, grouped rows stay together.
        picked += [(name, r) for r in pool[:n]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "split"])
        for name, r in picked:
            rel = r["key"].split("/", 1)[1]
            w.writerow([str(HAM / rel), "malignant" if r["label"] == "1" else "benign", r["group"], name])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "phase2-modes")
    args = ap.parse_args(argv)
    if not HAM.is_dir():
        print(f"needs {HAM}", file=sys.stderr)
        return 2
    manifest = build_manifest(args.work / "subset.csv", args.train, args.val)
    results = {}
    for mode in ("cached", "plain"):
        out = args.work / f"run-{mode}-{int(time.time())}"
        cmd = [sys.executable, "-m", "melanoma_detector", "train", "--data", str(manifest), "--out", str(out),
               "--backbone", args.backbone, "--image-size", str(args.image_size), "--epochs-frozen", "25",
               "--epochs-finetune", str(args.epochs), "--lr-finetune", str(args.lr), "--phase2-mode", mode,
               "--cache-views", str(args.views), "--cache-dir", str(args.work / "cache"), "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        rows = list(csv.DictReader((out / "metrics.csv").open()))
        p1 = [r for r in rows if r["phase"] == "phase1"]
        p2 = [r for r in rows if r["phase"] == "phase2"]
        metrics = json.loads((out / "metrics.json").read_text())
        results[mode] = {
            "phase1_best_auc": max(float(r["val_auc"]) for r in p1),
            "phase2_aucs": [round(float(r["val_auc"]), 4) for r in p2],
            "phase2_epoch_s": sum(float(r["seconds"]) for r in p2) / len(p2),
            "wall_s": wall,
            "final_val_auc": metrics["val"]["roc_auc"],
        }
        print(mode, json.dumps(results[mode]), flush=True)
    print()
    print(f"{args.train} train / {args.val} val HAM10000 images, {args.backbone} @ {args.image_size}px, "
          f"{args.epochs} phase-2 epochs, lr {args.lr}, cached views K={args.views}")
    print("| phase 2 mode | s / epoch (train + val) | val AUC per phase-2 epoch | best val AUC | whole run wall s (incl. cache build) |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['phase2_epoch_s']:.0f} | {r['phase2_aucs']} | {r['final_val_auc']:.4f} | {r['wall_s']:.0f} |")
    print(f"phase 1 best val AUC (frozen features): {results['cached']['phase1_best_auc']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
