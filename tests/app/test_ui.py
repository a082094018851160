"""The page's helpers that need no server: the heatmap file cache."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from melanoma_detector.app.ui import cache_png


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))


def test_cache_png_writes_once_and_never_rewrites(tmp_path):
    first = cache_png(_image(0), tmp_path)
    before = os.stat(first)
    with open(first, "rb") as reader:  # a download in progress when the same overlay is rendered again
        head = reader.read(10)
        again = cache_png(_image(0), tmp_path)
        rest = reader.read()
    assert again == first
    after = os.stat(first)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert len(head) + len(rest) == before.st_size
    with Image.open(first) as img:
        assert img.format == "PNG" and img.size == (60, 40)
        assert np.array_equal(np.asarray(img), np.asarray(_image(0)))


def test_cache_png_new_content_gets_a_new_file_and_leaves_no_staging_files(tmp_path):
    a = cache_png(_image(0), tmp_path)
    b = cache_png(_image(1), tmp_path, name="overlay")
    assert a != b and b.endswith("overlay.png")
    assert os.path.dirname(a) != os.path.dirname(b)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted(["heatmap.png", "overlay.png"])
