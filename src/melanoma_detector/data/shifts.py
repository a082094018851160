"""What another device does to an image, in Pillow + numpy only: the `acquisition` augmentation
draws these at random while training, and `benchmarks/acquisition_shift.py` applies them at fixed
strengths to test images on the torch-free serving side."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image


def channel_gains(img: Image.Image, gains: Sequence[float]) -> Image.Image:
    """Multiply R, G and B by their own factor (a white-balance cast), rounded and clipped to uint8."""
    arr = np.asarray(img, np.float32) * np.asarray(gains, np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """Encode as JPEG at `quality` and decode again: the block artefacts of a compressed upload."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
