"""Training speed on this machine: frozen feature pass, head epochs on cached features, and a
phase-2 step plain vs cached, for tf_efficientnet_lite0 and tf_efficientnet_lite2.

    python benchmarks/train_speed.py [--images 256] [--threads 2] [--backbones ...]

Uses a sample of real images from ../shared/data/ham10000 (falls back to generated images).
Prints a Markdown table; docs/benchmarks.md holds the figures measured here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ham10000"
SIZES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}


def sample_images(n: int) -> list:
    from melanoma_detector.data.discovery import Sample

    if SHARED.is_dir():
        files = sorted((SHARED / "benign").glob("*.jpg"))[: n // 2] + sorted((SHARED / "malignant").glob("*.jpg"))[: n - n // 2]
        return [Sample(str(f), int("malignant" in f.parent.name), key=f.name) for f in files]
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_class_folder

    tmp = Path(tempfile.mkdtemp())
    files = make_class_folder(tmp, n // 2, np.random.default_rng(0))
    return [Sample(str(f), int(f.parent.name == "malignant"), key=f.name) for f in files]


def plain_feature_pass(backbone, samples, pp) -> float:
    """The naive loop: decode + preprocess in the main thread, NCHW, no_grad."""
    from melanoma_detector.data.io import load_image
    from melanoma_detector.preprocess import preprocess_image

    backbone.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(samples), 32):
            x = torch.from_numpy(np.stack([preprocess_image(load_image(s.path), pp) for s in samples[i : i + 32]]))
            backbone.forward_features(x).mean(dim=(2, 3))
    return len(samples) / (time.perf_counter() - t0)


def head_epochs(num_features: int, *, n: int = 10_000, epochs: int = 25) -> float:
    from melanoma_detector.models.factory import SeedHead
    from melanoma_detector.training.engine import evaluate, train_one_epoch
    from melanoma_detector.training.trainer import TensorBatches, _adam, single_thread

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(n, num_features)).astype(np.float32))
    y = torch.from_numpy((rng.random(n) < 0.12).astype(np.float32))
    head = SeedHead(num_features)
    opt = _adam(head.l2_parameters(), list(head.parameters()), lr=1e-3, l2=1e-3)
    tl = TensorBatches(x, y, batch_size=32, shuffle=True)
    vl = TensorBatches(x[:1500], y[:1500], batch_size=1024, shuffle=False)
    t0 = time.perf_counter()
    with single_thread():  # as the trainer runs it
        for _ in range(epochs):
            train_one_epoch(head, tl, opt, device=torch.device("cpu"), class_w=(0.57, 4.2))
            evaluate(head, vl, device=torch.device("cpu"))
    return time.perf_counter() - t0


def phase2_steps(model, size: int, *, steps: int = 3, batch: int = 32) -> tuple[float, float]:
    """images/s of a phase-2 training step (forward + backward + Adam), plain vs cached."""
    from melanoma_detector.models.factory import set_trainable_top, split_backbone, train_mode

    frozen = set_trainable_top(model, 0.3)
    bottom, top = split_backbone(model.backbone, 0.3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch) < 0.5).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def plain():
        train_mode(model, frozen)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        bottom.eval()
        cached_input = bottom(x).half()  # what the cache stores (float16)

    def cached():
        train_mode(model, frozen)
        f = top(cached_input.float())
        loss = loss_fn(model.head(f.mean(dim=(2, 3))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = []
    for fn in (plain, cached):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        out.append(steps * batch / (time.perf_counter() - t0))
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--parts", nargs="+", default=["features", "head", "phase2"], choices=["features", "head", "phase2"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from melanoma_detector.models.factory import create_model, default_preprocessing
    from melanoma_detector.training.features import pooled_features

    samples = sample_images(args.images)
    print(f"{len(samples)} images from {'HAM10000' if SHARED.is_dir() else 'a generated folder'}, "
          f"{args.threads} threads, torch {torch.__version__}", flush=True)
    rows = []
    for name in args.backbones:
        size = SIZES.get(name, 224)
        model = create_model(name, pretrained=True, allow_random_init=True)
        pp = default_preprocessing(model.backbone, image_size=size, resize_mode="crop")
        nan = float("nan")
        naive, fast, head_s, p_plain, p_cached = nan, {0: nan, 1: nan}, nan, nan, nan
        if "features" in args.parts:
            naive = plain_feature_pass(model.backbone, samples, pp)
            for workers in (0, 1):
                t0 = time.perf_counter()
                pooled_features(model.backbone, samples, pp, device=torch.device("cpu"), cache_dir=None,
                                batch_size=32, workers=workers, progress=False)
                fast[workers] = len(samples) / (time.perf_counter() - t0)
        if "head" in args.parts:
            head_s = head_epochs(model.backbone.num_features)
        if "phase2" in args.parts:
            p_plain, p_cached = phase2_steps(model, size, steps=args.steps)
        rows.append((name, size, naive, fast[0], fast[1], head_s, p_plain, p_cached))
        print(f"  {name}: done", flush=True)
    print()
    print("| backbone | px | feature pass, naive loop (img/s) | feature pass, pipeline w=0 (img/s) | "
          "pipeline w=1 (img/s) | 25 head epochs, 10k cached (s) | phase-2 step plain (img/s) | "
          "phase-2 step cached (img/s) | cached / plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size, naive, f0, f1, hs, pp_, pc in rows:
        print(f"| {name} | {size} | {naive:.1f} | {f0:.1f} | {f1:.1f} | {hs:.1f} | {pp_:.1f} | {pc:.1f} | {pc / pp_:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
