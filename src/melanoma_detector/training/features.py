"""On-disk caches that make CPU training affordable.

Phase 1 trains only the head on a frozen backbone, so the pooled backbone features of each image
are a fixed function of the image: compute them once and the seed's 25 frozen epochs take
seconds. Phase 2 keeps the bottom 70% of the backbone frozen (BatchNorm in eval mode), so its
output is also fixed per input view: the cached phase 2 stores it for K augmented views per
image (float16) and trains only the top blocks and the head.

Caches are keyed by the images (path, size, mtime), a fingerprint of the backbone weights, the
preprocessing and the transform, so a stale cache is never reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from melanoma_detector.data.dataset import ImageDataset
from melanoma_detector.data.discovery import Sample
from melanoma_detector.data.transforms import build_transforms
from melanoma_detector.fileio import atomic_path
from melanoma_detector.preprocess import Preprocessing
from melanoma_detector.training.distributed import DistInfo, barrier, broadcast_object, gather_concat, shard_range

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MELANOMA_CACHE", Path.home() / ".cache" / "melanoma-detector"))


def keeps_global_rng(fn):
    """Run `fn` without moving torch's global random state. A cache pass draws from it (every DataLoader
    iteration takes a seed) only when the cache misses, so without this a cold cache and a warm one would
    train different models from the same seed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(samples: Sequence[Sample], **parts) -> str:
    h = hashlib.sha256()
    for s in samples:
        st = os.stat(s.path)
        h.update(f"{s.path}|{st.st_size}|{int(st.st_mtime)}\n".encode("utf-8", "surrogateescape"))
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _loader(samples, transform, batch_size, workers, *, rows: tuple[int, int], seed: int | None = None, device=None):
    # A seed makes each image's augmentation a function of (seed, image index) alone, so a view
    # is the same whichever rank or worker computes it; hence the Subset over global indices.
    return DataLoader(
        Subset(ImageDataset(samples, transform, seed=seed), range(*rows)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=False,
    )


def denormals_flushed() -> bool:
    """Whether this thread treats denormals as zero (a denormal input then multiplies to 0)."""
    return float(np.float32(1e-39) * np.float32(1.0)) == 0.0


# Below this many images, exporting the frozen part to ONNX costs more than it saves.
ONNX_MIN_IMAGES = 512


def onnx_engine(module: nn.Module, example: torch.Tensor):
    """The frozen `module` as an ONNX Runtime function (NCHW float32 tensor in, tensor out).

    Measured here for Lite2 at 260 px, 2 threads: ~13% more images/s than PyTorch eager with
    channels_last, same features within 1e-5. Returns None when onnx/onnxruntime are missing
    or the export fails, and the caller stays on PyTorch."""
    flushing = denormals_flushed()
    try:
        import io
        import warnings

        import onnxruntime as ort

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example, buf, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure just means: stay on PyTorch
        log.info("ONNX Runtime feature engine unavailable (%s); using PyTorch", str(exc).splitlines()[0][:120])
        return None
    finally:
        if flushing and not denormals_flushed():
            # The export and the session's creation clear this thread's flush-denormal flag
            # (measured): head epochs that follow then slow down 2x as values decay.
            torch.set_flush_denormal(True)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])

    return run


def _pick_engine(module: nn.Module, engine: str, *, device: torch.device, n: int, input_size: int):
    if engine == "torch" or device.type != "cpu" or (engine == "auto" and n < ONNX_MIN_IMAGES):
        return None
    fn = onnx_engine(module, torch.zeros(2, 3, input_size, input_size))
    if fn is None and engine == "onnxruntime":
        log.warning("feature_engine onnxruntime requested but unavailable (pip install '.[export]'); using PyTorch")
    return fn


@torch.inference_mode()
def _run(module: nn.Module, loader, *, device, flip_average: bool, pool: bool, progress: bool, desc: str,
         out=None, offset: int = 0, amp_dtype=None, engine=None):
    from tqdm import tqdm

    module.eval()
    chunks = []
    for x, _, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if engine is not None:
            f = engine(x)
            if flip_average:
                g = engine(torch.flip(x, dims=(3,)))
                f = (f + (g.flip(dims=(3,)) if g.dim() == 4 else g)) / 2
        else:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                f = module(x)
                if flip_average:
                    g = module(torch.flip(x, dims=(3,)))
                    f = (f + (g.flip(dims=(3,)) if g.dim() == 4 else g)) / 2  # pooled output has no width to flip
        if pool and f.dim() == 4:
            f = f.mean(dim=(2, 3))
        f = f.float().cpu().numpy()
        if out is not None:
            out[offset : offset + len(f)] = f.astype(out.dtype)
            offset += len(f)
        else:
            chunks.append(f)
    return np.concatenate(chunks) if out is None else out


@keeps_global_rng
def pooled_features(
    backbone: nn.Module,
    samples: Sequence[Sample],
    pp: Preprocessing,
    *,
    device: torch.device,
    cache_dir: Path | None,
    batch_size: int = 32,
    workers: int = 0,
    flip_average: bool = False,
    progress: bool = True,
    fingerprint: str | None = None,
    dist: DistInfo = DistInfo(),
    amp_dtype: torch.dtype | None = None,
    engine: str = "auto",
) -> np.ndarray:
    """Global-average-pooled `backbone.forward_features` of every sample (eval transform).

    `engine`: "torch", "onnxruntime" or "auto" (ONNX Runtime on CPU for >= 512 images when
    installed). Under torchrun each rank computes a contiguous slice and the slices are gathered."""

    class Pooled(nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, x):
            return self.b.forward_features(x).mean(dim=(2, 3))

    key = None
    if cache_dir is not None:
        key = cache_key(
            samples, kind="pooled", fp=fingerprint or module_fingerprint(backbone), pp=pp.to_dict(), flip=flip_average,
            amp=str(amp_dtype),  # bf16 features differ from fp32 ones by up to 0.1: never served for each other
        )
        path = Path(cache_dir) / f"pooled-{key}.npy"
        if broadcast_object(path.is_file(), dist):
            log.info("feature cache hit: %s", path)
            return np.load(path)
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    start, end = shard_range(len(samples), dist)
    fn = _pick_engine(Pooled(backbone), engine, device=device, n=end - start, input_size=pp.input_size)
    feats = _run(
        Pooled(backbone),
        _loader(samples, build_transforms(pp, train=False), batch_size, workers, rows=(start, end), device=device),
        device=device,
        flip_average=flip_average,
        pool=True,
        progress=progress,
        desc="features",
        amp_dtype=amp_dtype,
        engine=fn,
    )
    feats = gather_concat(feats.reshape(end - start, -1), dist)
    log.info("pooled features: %d images in %.1fs", len(samples), time.perf_counter() - t0)
    if key is not None and dist.is_main:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(cache_dir) / f"pooled-{key}.npy") as tmp:
            np.save(tmp, feats)
    return feats


class ViewStack:
    """(views, N, C, H, W) over one float16 memmap per view, so caches of K and K+2 views share
    their first K views."""

    def __init__(self, views: list[np.ndarray]):
        self.views = views
        self.shape = (len(views), *views[0].shape)

    def __getitem__(self, index):
        v, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        return self.views[v][rest] if rest else self.views[v]


@keeps_global_rng
def bottom_feature_cache(
    bottom: nn.Module,
    samples: Sequence[Sample],
    pp: Preprocessing,
    *,
    views: int,
    train: bool,
    device: torch.device,
    cache_dir: Path,
    seed: int,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    fingerprint: str | None = None,
    dist: DistInfo = DistInfo(),
    engine: str = "auto",
    augmentation: str = "standard",
) -> ViewStack:
    """float16 memmaps of the frozen bottom's output: `views` augmented views (train) or one
    deterministic view (eval), one file per view.

    Under torchrun each rank fills its own rows of the same file, so `cache_dir` must be on a
    file system all ranks share."""
    views = views if train else 1
    fp = fingerprint or module_fingerprint(bottom)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    fn, picked = None, False
    for v in range(views):
        view_seed = seed * 1000 + v
        # Only a non-default augmentation enters the key, so caches written before it existed stay valid.
        extra = {"augmentation": augmentation} if train and augmentation != "standard" else {}
        key = cache_key(samples, kind="bottom-view", fp=fp, pp=pp.to_dict(), train=train, seed=view_seed, **extra)
        path, meta_path = cache_dir / f"bottom-{key}.f16", cache_dir / f"bottom-{key}.json"
        if broadcast_object(path.is_file() and meta_path.is_file(), dist):
            shape = tuple(json.loads(meta_path.read_text())["shape"])
            log.info("phase-2 cache hit (view %d): %s", v + 1, path)
            out.append(np.memmap(path, dtype=np.float16, mode="r", shape=shape))
            continue
        bottom = bottom.to(device).to(memory_format=torch.channels_last).eval()
        with torch.inference_mode():
            probe = bottom(torch.zeros(1, 3, pp.input_size, pp.input_size, device=device))
        shape = (len(samples), *probe.shape[1:])
        tmp = cache_dir / f".bottom-{key}.{broadcast_object(os.getpid(), dist)}.f16"
        if dist.is_main:
            np.memmap(tmp, dtype=np.float16, mode="w+", shape=shape).flush()
        barrier(dist)
        mm = np.memmap(tmp, dtype=np.float16, mode="r+", shape=shape)
        start, end = shard_range(len(samples), dist)
        t0 = time.perf_counter()
        if not picked:
            fn, picked = _pick_engine(bottom, engine, device=device, n=end - start, input_size=pp.input_size), True
        _run(
            bottom,
            _loader(samples, build_transforms(pp, train=train, augmentation=augmentation), batch_size, workers, rows=(start, end),
                    seed=view_seed if train else None, device=device),
            device=device,
            flip_average=False,
            pool=False,
            progress=progress,
            desc=f"phase-2 cache view {v + 1}/{views}",
            out=mm[start:end],
            engine=fn,
        )
        mm.flush()
        del mm
        barrier(dist)
        if dist.is_main:
            os.replace(tmp, path)
            meta_path.write_text(json.dumps({"shape": list(shape)}))
        barrier(dist)
        log.info("phase-2 cache view %d: %d images in %.1fs", v + 1, len(samples), time.perf_counter() - t0)
        out.append(np.memmap(path, dtype=np.float16, mode="r", shape=shape))
    return ViewStack(out)
