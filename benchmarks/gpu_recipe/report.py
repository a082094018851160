"""Figures of a run for docs/scaling.md: training images/s per phase (from the run's metrics.csv),
evaluation images/s (timed here over the run's val + test images) and wall time. A run stopped before
it finished (run.sh's time limit) still gets its per-phase figures; the best epoch and the evaluation
speed need the final checkpoint."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--wall", type=float, help="wall seconds of the whole train command")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import apply_split_file
    from melanoma_detector.models.checkpoint import checkpoint_preprocessing, load_checkpoint
    from melanoma_detector.training.engine import amp_dtype_for, predict_logits
    from melanoma_detector.training.sampling import build_image_loader

    if not (args.run / "metrics.csv").is_file():
        print(json.dumps({"wall_seconds": args.wall, "epochs": 0, "note": "no epoch finished"}))
        return 1
    rows = list(csv.DictReader((args.run / "metrics.csv").open()))
    out = {"wall_seconds": args.wall, "epochs": len(rows)}
    for phase in ("phase1", "phase2"):
        r = [x for x in rows if x["phase"] == phase]
        if r:
            n = sum(int(x["train_images"]) for x in r)
            t = sum(float(x["train_seconds"]) for x in r)
            out[f"{phase}_epochs"] = len(r)
            out[f"{phase}_train_images_per_s"] = round(n / t, 1)
            out[f"{phase}_seconds"] = round(sum(float(x["seconds"]) for x in r), 1)
    out["val_auc_by_epoch"] = [(x["phase"], int(x["epoch"]), float(x["val_auc"])) for x in rows if x.get("val_auc")]
    if not (args.run / "metrics.json").is_file():  # stopped before its final step: no checkpoint to time
        out["note"] = "stopped before the end: per-phase figures only (continue with `melanoma train --resume`)"
        return _emit(out, args.json)
    metrics = json.loads((args.run / "metrics.json").read_text())
    out["best"] = metrics["best"]
    out["test_auc"] = metrics.get("test", {}).get("roc_auc")

    model, ckpt = load_checkpoint(args.run / "checkpoint.pt")
    pp = checkpoint_preprocessing(ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).to(memory_format=torch.channels_last)
    samples = [s for src in discover_all(ckpt["config"]["data"]["paths"]) for s in src.samples]
    apply_split_file(samples, args.run / "split.csv")
    samples = [s for s in samples if s.split in ("val", "test")]
    loader = build_image_loader(samples, pp, args.batch_size, workers=args.workers, device=device, train=False)
    amp = amp_dtype_for("auto", device)
    predict_logits(model, loader, device=device, amp_dtype=amp)  # warm-up (cuDNN autotune, workers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    predict_logits(model, loader, device=device, amp_dtype=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out["eval_images_per_s"] = round(len(samples) / (time.perf_counter() - t0), 1)
    out["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    return _emit(out, args.json)


def _emit(out: dict, path: Path | None) -> int:
    text = json.dumps(out, indent=2)
    print(text)
    if path is not None:
        path.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
