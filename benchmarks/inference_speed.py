"""End-to-end inference speed: decode + preprocess + model, ONNX Runtime predictor vs PyTorch
eager on the same model, in the same run; and the serving process's peak RSS.

    python benchmarks/inference_speed.py [--bundle models/default] [--checkpoint RUN/checkpoint.pt [RUN2/checkpoint.pt]]
                                         [--threads 2] [--repeats 60] [--install-time]

Without --checkpoint the PyTorch side is the bundle's architecture (each member's, for an ensemble)
with ImageNet backbone weights and a random head: the same graph and cost, so the timing comparison
holds, but no probability parity is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))

SERVE_RSS = r"""
import json, sys, time
t0 = time.perf_counter()
from melanoma_detector.inference import Predictor
p = Predictor(sys.argv[1], threads=int(sys.argv[2]))
paths = sys.argv[3:]
for _ in range(5):
    p.predict_paths(paths, batch_size=16)
    for path in paths:
        p.predict(path, heatmap=True)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the (torch-laden) parent.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_rss_mb": hwm / 1024,
                  "torch_imported": "torch" in sys.modules, "startup_and_run_s": time.perf_counter() - t0}))
"""


def percentiles(xs):
    a = np.asarray(xs) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def bench_onnx(bundle: Path, threads: int, repeats: int):
    from melanoma_detector.inference import Predictor

    pred = Predictor(bundle, threads=threads)
    paths = [str(p) for p in EXAMPLES]
    for p in paths[:3]:
        pred.predict(p)
    lat = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pred.predict(paths[i % len(paths)])
        lat.append(time.perf_counter() - t0)
    batch = (paths * 4)[:16]
    pred.predict_paths(batch, batch_size=16)
    t0 = time.perf_counter()
    n_rounds = max(3, repeats // 16)
    for _ in range(n_rounds):
        pred.predict_paths(batch, batch_size=16, workers=1)
    thr = 16 * n_rounds / (time.perf_counter() - t0)
    return (*percentiles(lat), thr, pred)


def bench_torch(pred_onnx, checkpoint: Path | None, threads: int, repeats: int):
    import torch

    from melanoma_detector.data.io import load_image
    from melanoma_detector.models.checkpoint import load_checkpoint
    from melanoma_detector.models.factory import create_model
    from melanoma_detector.preprocess import preprocess_image

    torch.set_num_threads(threads)
    if checkpoint:
        members = [load_checkpoint(c)[0] for c in checkpoint]
    else:  # each member's architecture with ImageNet backbone weights and a random head: the same cost
        meta = pred_onnx.bundle.metadata
        configs = [m["config"]["model"] for m in meta.get("training", {}).get("members", [])] or \
            [{"backbone": meta["backbone"], **meta.get("training", {}).get("config", {}).get("model", {})}]
        members = [create_model(c["backbone"], pretrained=True, allow_random_init=True,
                                hidden=c.get("hidden", (512, 256))).eval() for c in configs]

    def model(x):  # an ensemble bundle serves the members' mean logit
        return members[0](x) if len(members) == 1 else torch.stack([m(x) for m in members]).mean(dim=0)
    pp = pred_onnx.pp
    paths = [str(p) for p in EXAMPLES]

    @torch.inference_mode()
    def one(path):
        x = torch.from_numpy(preprocess_image(load_image(path), pp))[None]
        return torch.sigmoid(model(x) / pred_onnx.temperature + pred_onnx.logit_bias).item()  # as served

    for p in paths[:3]:
        one(p)
    parity = None
    if checkpoint:  # the same trained weights on both sides: served probabilities must agree
        with torch.inference_mode():
            x = torch.from_numpy(np.stack([preprocess_image(load_image(p), pp) for p in paths]))
            p_torch = torch.sigmoid(model(x).squeeze(-1).double() / pred_onnx.temperature + pred_onnx.logit_bias)
        rows = [pred_onnx.predict(p) for p in paths]
        parity = max(abs(r["probability_malignant"] - float(t)) for r, t in zip(rows, p_torch) if r["status"] == "ok")
    lat = []
    for i in range(repeats):
        t0 = time.perf_counter()
        one(paths[i % len(paths)])
        lat.append(time.perf_counter() - t0)
    batch = (paths * 4)[:16]
    n_rounds = max(3, repeats // 16)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(n_rounds):
            x = torch.from_numpy(np.stack([preprocess_image(load_image(p), pp) for p in batch]))
            model(x)
        thr = 16 * n_rounds / (time.perf_counter() - t0)
    return (*percentiles(lat), thr, parity)


def serving_rss(bundle: Path, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", SERVE_RSS, str(bundle), str(threads), *map(str, EXAMPLES)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def install_time() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "venv", f"{tmp}/venv"], check=True)
        t0 = time.perf_counter()
        subprocess.run([f"{tmp}/venv/bin/pip", "install", "-q", "--no-cache-dir", "-c", str(ROOT / "constraints.txt"),
                        f"{ROOT}[serve]"], check=True)
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--checkpoint", type=Path, nargs="+",
                    help="the bundle's checkpoint; an ensemble bundle's members, in export order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--install-time", action="store_true", help="also time `pip install .[serve]` into a fresh venv")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not EXAMPLES:
        print("examples/ holds no images", file=sys.stderr)
        return 2
    o50, o95, othr, pred = bench_onnx(args.bundle, args.threads, args.repeats)
    t50, t95, tthr, parity = bench_torch(pred, args.checkpoint, args.threads, args.repeats)
    rss = serving_rss(args.bundle, args.threads)
    meta = pred.bundle.metadata
    print(f"model {meta['model_version']} ({meta['backbone']}, {meta['preprocessing']['input_size']} px), "
          f"{args.threads} threads, {len(EXAMPLES)} example images, {args.repeats} single-image runs")
    print()
    print("| path | p50 ms (batch 1) | p95 ms (batch 1) | images/s (batch 16) |")
    print("|---|---|---|---|")
    print(f"| ONNX Runtime predictor | {o50:.1f} | {o95:.1f} | {othr:.1f} |")
    print(f"| PyTorch eager | {t50:.1f} | {t95:.1f} | {tthr:.1f} |")
    print(f"| ONNX speed-up | {t50 / o50:.2f}x | {t95 / o95:.2f}x | {othr / tthr:.2f}x |")
    if parity is not None:
        print(f"\nparity: max |p_onnx - p_torch| over the {len(EXAMPLES)} example images: {parity:.1e}")
    print()
    print(f"serving process (Predictor only, incl. heatmaps): peak RSS {rss['peak_rss_mb']:.0f} MB, "
          f"torch imported: {rss['torch_imported']}")
    if args.install_time:
        print(f"pip install '.[serve]' into a fresh venv: {install_time():.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
