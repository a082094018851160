"""torch Dataset over discovered samples, and the up-front image validation pass."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from melanoma_detector.data.discovery import Sample
from melanoma_detector.data.io import load_image
from melanoma_detector.errors import DataError, ImageDecodeError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(load_image(s.path)), torch.tensor(float(s.label)), i


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
    and returned so the caller can report how many.
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
    bad = [r for r in results if r] + [f"{p}: not an image file (extension)" for p in non_images]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"bad image in data: {bad[0]}{more}; fix or remove it, or pass --skip-bad-images")
    good = [s for s, r in zip(samples, results) if r is None]
    if bad:
        log.warning("skipped %d bad file(s) (--skip-bad-images); first: %s", len(bad), bad[0])
    return good, bad
