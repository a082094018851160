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

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from melanoma_detector.data.dataset import ImageDataset
from melanoma_detector.data.discovery import Sample
from melanoma_detector.data.transforms import build_transforms
from melanoma_detector.preprocess import Preprocessing

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MELANOMA_CACHE", Path.home() / ".cache" / "melanoma-detector"))


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
        h.update(f"{s.path}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _loader(samples, transform, batch_size, workers, *, seed: int | None = None):
    g = None
    if seed is not None:
        g = torch.Generator()
        g.manual_seed(seed)
    return DataLoader(
        ImageDataset(samples, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_seed_worker if workers else None,
        generator=g,
        persistent_workers=False,
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@torch.inference_mode()
def _run(module: nn.Module, loader, *, device, flip_average: bool, pool: bool, progress: bool, desc: str, out=None):
    from tqdm import tqdm

    module.eval()
    chunks, offset = [], 0
    for x, _, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        f = module(x)
        if flip_average:
            f = (f + module(torch.flip(x, dims=(3,))).flip(dims=(3,))) / 2
        if pool:
            f = f.mean(dim=(2, 3))
        f = f.float().cpu().numpy()
        if out is not None:
            out[offset : offset + len(f)] = f.astype(out.dtype)
            offset += len(f)
        else:
            chunks.append(f)
    return np.concatenate(chunks) if out is None else out


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
) -> np.ndarray:
    """Global-average-pooled `backbone.forward_features` of every sample (eval transform)."""

    class Pooled(nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, x):
            return self.b.forward_features(x)

    key = None
    if cache_dir is not None:
        key = cache_key(
            samples, kind="pooled", fp=fingerprint or module_fingerprint(backbone), pp=pp.to_dict(), flip=flip_average
        )
        path = Path(cache_dir) / f"pooled-{key}.npy"
        if path.is_file():
            log.info("feature cache hit: %s", path)
            return np.load(path)
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    feats = _run(
        Pooled(backbone),
        _loader(samples, build_transforms(pp, train=False), batch_size, workers),
        device=device,
        flip_average=flip_average,
        pool=True,
        progress=progress,
        desc="features",
    )
    log.info("pooled features: %d images in %.1fs", len(samples), time.perf_counter() - t0)
    if key is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_dir) / f".pooled-{key}.{os.getpid()}.npy"
        np.save(tmp, feats)
        os.replace(tmp, Path(cache_dir) / f"pooled-{key}.npy")
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
) -> ViewStack:
    """float16 memmaps of the frozen bottom's output: `views` augmented views (train) or one
    deterministic view (eval), one file per view."""
    views = views if train else 1
    fp = fingerprint or module_fingerprint(bottom)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for v in range(views):
        view_seed = seed * 1000 + v
        key = cache_key(samples, kind="bottom-view", fp=fp, pp=pp.to_dict(), train=train, seed=view_seed)
        path, meta_path = cache_dir / f"bottom-{key}.f16", cache_dir / f"bottom-{key}.json"
        if path.is_file() and meta_path.is_file():
            shape = tuple(json.loads(meta_path.read_text())["shape"])
            log.info("phase-2 cache hit (view %d): %s", v + 1, path)
            out.append(np.memmap(path, dtype=np.float16, mode="r", shape=shape))
            continue
        bottom = bottom.to(device).to(memory_format=torch.channels_last).eval()
        with torch.inference_mode():
            probe = bottom(torch.zeros(1, 3, pp.input_size, pp.input_size, device=device))
        shape = (len(samples), *probe.shape[1:])
        tmp = cache_dir / f".bottom-{key}.{os.getpid()}.f16"
        mm = np.memmap(tmp, dtype=np.float16, mode="w+", shape=shape)
        t0 = time.perf_counter()
        random.seed(view_seed)
        torch.manual_seed(view_seed)
        _run(
            bottom,
            _loader(samples, build_transforms(pp, train=train), batch_size, workers, seed=view_seed),
            device=device,
            flip_average=False,
            pool=False,
            progress=progress,
            desc=f"phase-2 cache view {v + 1}/{views}",
            out=mm,
        )
        mm.flush()
        del mm
        os.replace(tmp, path)
        meta_path.write_text(json.dumps({"shape": list(shape)}))
        log.info("phase-2 cache view %d: %d images in %.1fs", v + 1, len(samples), time.perf_counter() - t0)
        out.append(np.memmap(path, dtype=np.float16, mode="r", shape=shape))
    return ViewStack(out)
