"""Training speed on this machine: frozen feature pass, head epochs on cached features, and a
phase-2 step plain vs cached, for tf_efficientnet_lite0 and tf_efficientnet_lite2.

    python benchmarks/train_speed.py [--images 256] [--threads 2] [--backbones ...]
        [--image-size PX] [--unfreeze-fraction F] [--memory-format channels_last|nchw]
        [--parts features head phase2]

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


class _Pooled(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.b = backbone

    def forward(self, x):
        return self.b.forward_features(x).mean(dim=(2, 3))


def head_epochs(num_features: int, *, n: int = 10_000, epochs: int = 25) -> float:
    from melanoma_detector.models.factory import SeedHead
    from melanoma_detector.training.engine import evaluate, train_one_epoch
    from melanoma_detector.training.sampling import TensorBatches
    from melanoma_detector.training.trainer import _adam, single_thread

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


def phase2_steps(model, size: int, *, fraction: float = 0.3, steps: int = 3, batch: int = 32,
                 channels_last: bool = False) -> tuple[float, float]:
    """images/s of a phase-2 training step (forward + backward + Adam), plain vs cached; median step."""
    from melanoma_detector.models.factory import set_trainable_top, split_backbone, train_mode

    frozen = set_trainable_top(model, fraction)
    bottom, top = split_backbone(model.backbone, fraction)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(batch, 3, size, size)
    if channels_last:  # as the trainer runs it
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
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
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out.append(batch / float(np.median(times)))  # the median resists a busy neighbour
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=None, help="default: 224 / 240 / 260 for Lite0 / 1 / 2")
    ap.add_argument("--unfreeze-fraction", type=float, default=0.3, help="top of the backbone trained in phase 2")
    ap.add_argument("--memory-format", choices=["channels_last", "nchw"], default="nchw",
                    help="phase-2 layout (the trainer uses channels_last; nchw matches the older figures)")
    ap.add_argument("--parts", nargs="+", default=["features", "head", "phase2"], choices=["features", "head", "phase2"])
    args = ap.parse_args(argv)
    from melanoma_detector.training.engine import flush_denormals

    flush_denormals()  # as `melanoma train` does, before torch starts its threads
    torch.set_num_threads(args.threads)
    from melanoma_detector.models.factory import create_model, default_preprocessing
    from melanoma_detector.training.features import pooled_features

    samples = sample_images(args.images)
    print(f"{len(samples)} images from {'HAM10000' if SHARED.is_dir() else 'a generated folder'}, "
          f"{args.threads} threads, torch {torch.__version__}", flush=True)
    rows, export_s = [], {}
    for name in args.backbones:
        size = args.image_size or SIZES.get(name, 224)
        model = create_model(name, pretrained=True, allow_random_init=True)
        pp = default_preprocessing(model.backbone, image_size=size, resize_mode="crop")
        nan = float("nan")
        naive, head_s, p_plain, p_cached = nan, nan, nan, nan
        fast = {(e, w): nan for e in ("torch", "onnxruntime") for w in (0, 1)}
        if "features" in args.parts:
            naive = plain_feature_pass(model.backbone, samples, pp)
            # The one-off ONNX export (seconds) is timed apart: over a real data set it is amortised. The
            # engine built here is the one the timed passes use, so no export time is in (or subtracted from)
            # their rates: subtracting a separately timed export once gave negative rates on a busy machine.
            from unittest import mock

            from melanoma_detector.training import features

            t0 = time.perf_counter()
            built = features.onnx_engine(_Pooled(model.backbone), torch.zeros(2, 3, size, size))
            export_s[name] = time.perf_counter() - t0
            for engine, workers in fast:
                with mock.patch.object(features, "onnx_engine", lambda *_a, **_k: built):
                    t0 = time.perf_counter()
                    pooled_features(model.backbone, samples, pp, device=torch.device("cpu"), cache_dir=None,
                                    batch_size=32, workers=workers, progress=False, engine=engine)
                    fast[engine, workers] = len(samples) / (time.perf_counter() - t0)
        if "head" in args.parts:
            head_s = head_epochs(model.backbone.num_features)
        if "phase2" in args.parts:
            p_plain, p_cached = phase2_steps(model, size, fraction=args.unfreeze_fraction, steps=args.steps,
                                             channels_last=args.memory_format == "channels_last")
        rows.append((name, size, naive, *fast.values(), head_s, p_plain, p_cached))
        print(f"  {name}: done", flush=True)
    print(f"\nphase 2: top {args.unfreeze_fraction:.0%} of the backbone trained, batch 32, {args.memory_format}, "
          f"median of {args.steps} steps")
    print("| backbone | px | feature pass (img/s): naive loop | torch w=0 | torch w=1 | ONNX Runtime w=0 | "
          "ONNX Runtime w=1 | 25 head epochs, 10k cached (s) | phase-2 step plain (img/s) | "
          "phase-2 step cached (img/s) | cached / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, size, naive, t0_, t1, o0, o1, hs, pp_, pc in rows:
        print(f"| {name} | {size} | {naive:.1f} | {t0_:.1f} | {t1:.1f} | {o0:.1f} | {o1:.1f} | {hs:.1f} | "
              f"{pp_:.1f} | {pc:.1f} | {pc / pp_:.1f}x |")
    if export_s:
        print("\nONNX export (once per run, not in the rates): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in export_s.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
