"""torch Dataset over discovered samples, and the up-front image validation pass."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset

from melanoma_detector.data.discovery import Sample
from melanoma_detector.data.io import IMAGE_EXTENSIONS, load_image
from melanoma_detector.errors import DataError, ImageDecodeError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """(image tensor, label, index) per sample.

    With `seed`, the random augmentation of item i in epoch e draws from its own seed
    (seed, e, i), so a run's inputs do not depend on the number of DataLoader workers, on how
    items are split across distributed ranks, or on where a resumed run picked up. A sampler
    passes epoch e as index `e * len(self) + i` (see `training.sampling.EpochSampler`).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, *, seed: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        epoch, i = divmod(index, len(self.samples))
        s = self.samples[i]
        img = load_image(s.path)
        if self.seed is None:
            x = self.transform(img)
        else:
            with seeded_rng(self.seed, epoch, i):
                x = self.transform(img)
        return x, torch.tensor(float(s.label)), i


class seeded_rng:
    """Seed Python's and torch's global RNGs (the ones torchvision transforms draw from) for one
    item, then restore them so dropout and shuffling are left untouched."""

    def __init__(self, *key: int):
        self.seed = hash(key) & 0x7FFF_FFFF_FFFF_FFFF

    def __enter__(self):
        self.py_state, self.torch_state = random.getstate(), torch.get_rng_state()
        random.seed(self.seed)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        random.setstate(self.py_state)
        torch.set_rng_state(self.torch_state)


def validate_images(
    samples: Sequence[Sample],
    *,
    skip_bad: bool,
    non_images: Sequence[str] = (),
    workers: int = 4,
    progress: bool = True,
) -> tuple[list[Sample], list[str]]:
    """Decode every image once before training so a bad file fails in seconds, not mid-epoch.

    Without `skip_bad` the first bad file is an error naming it; with it, bad files are dropped
    and returned so the caller can report how many. `non_images` (files whose extension is no image's, such as a
    notes.txt beside the images) are no training images at all, as `data check` says: they are left out with a
    warning, not refused as bad images.
    """
    from tqdm import tqdm

    def check(s: Sample) -> str | None:
        try:
            load_image(s.path)
            return None
        except ImageDecodeError as exc:
            return str(exc)

    with ThreadPoolExecutor(workers) as pool:
        results = list(
            tqdm(pool.map(check, samples), total=len(samples), desc="checking images", disable=not progress, leave=False)
        )
    if non_images:
        log.warning("left out %d non-image file(s) (accepted: %s), first: %s", len(non_images), ", ".join(IMAGE_EXTENSIONS),
                    non_images[0])
    bad = [r for r in results if r]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"bad image in data: {bad[0]}{more}; fix or remove it, or pass --skip-bad-images")
    good = [s for s, r in zip(samples, results) if r is None]
    if bad:
        log.warning("skipped %d bad file(s) (--skip-bad-images); first: %s", len(bad), bad[0])
    return good, bad
