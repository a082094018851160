"""Preprocessing of degenerate images: bounded time and memory, same output for ordinary photos."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from melanoma_detector.preprocess import MAX_ASPECT, Preprocessing, preprocess_image, resize_and_crop


@pytest.mark.parametrize("size", [(1, 1), (4000, 2), (2, 4000), (60_000, 1), (64, 400_000)])
@pytest.mark.parametrize("mode", ["crop", "squash"])
def test_extreme_sizes_are_fast(size, mode):
    """A 1x60000 strip used to be resized whole to 224 x 13.4M pixels (9 GB, ~30 s) in crop mode."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pp = Preprocessing(input_size=224, resize_mode=mode)
    t0 = time.perf_counter()
    arr = preprocess_image(img, pp)
    assert time.perf_counter() - t0 < 2.0
    assert arr.shape == (3, 224, 224) and np.isfinite(arr).all()


def test_strip_keeps_its_centre():
    """Beyond MAX_ASPECT:1 crop mode keeps the centre MAX_ASPECT:1 part, then crops as usual."""
    rng = np.random.default_rng(1)
    strip = Image.fromarray(rng.integers(0, 256, (10, 10 * (MAX_ASPECT + 5), 3), dtype=np.uint8))
    w, h = strip.size
    keep = MAX_ASPECT * h
    centre = strip.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    pp = Preprocessing(input_size=32)
    assert np.array_equal(np.asarray(resize_and_crop(strip, pp)), np.asarray(resize_and_crop(centre, pp)))


@pytest.mark.parametrize("size", [(600, 450), (450, 600), (1024, 768), (MAX_ASPECT * 30, 30)])
def test_ordinary_aspect_ratios_unchanged(size):
    """Up to MAX_ASPECT:1 the path is the original one: resize the shorter side, centre crop."""
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pp = Preprocessing(input_size=224)
    w, h = img.size
    if w <= h:
        new = (224, max(224, int(round(h * 224 / w))))
    else:
        new = (max(224, int(round(w * 224 / h))), 224)
    ref = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - 224) // 2, (new[1] - 224) // 2
    ref = ref.crop((left, top, left + 224, top + 224))
    assert np.array_equal(np.asarray(resize_and_crop(img, pp)), np.asarray(ref))
