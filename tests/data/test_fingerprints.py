"""Perceptual fingerprints of a model's seen images (`data.fingerprints`): copies under another name, size,
aspect or encoding are found; other lesions, and a file that is not the bundle's, are not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from melanoma_detector.data.fingerprints import COPY_BITS, SeenImages, count_copies, fingerprint_images
from melanoma_detector.errors import DataError

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.jpg"))
pytestmark = pytest.mark.skipif(len(EXAMPLES) < 12, reason="needs the 12 sample images in examples/")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _square(img: Image.Image) -> Image.Image:
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s))


COPIES = {
    "squashed to 300x300, JPEG 75": lambda im: _jpeg(im.resize((300, 300), Image.Resampling.BICUBIC), 75),
    "upscaled 3x, JPEG 90": lambda im: _jpeg(im.resize((im.width * 3, im.height * 3)), 90),
    "mirrored, JPEG 60": lambda im: _jpeg(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 60),
    "rotated 90 degrees, PNG": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "brighter by 15%": lambda im: _jpeg(ImageEnhance.Brightness(im).enhance(1.15), 90),
    "centred square crop, 300 px": lambda im: _jpeg(_square(im).resize((300, 300)), 90),
}


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> tuple[SeenImages, list[Path], list[Path]]:
    """The first 8 examples trained on (6) or validated on (2); the last 4 never seen."""
    prints = fingerprint_images({"train": [str(p) for p in EXAMPLES[:6]], "val": [str(p) for p in EXAMPLES[6:8]]})
    return prints, EXAMPLES[:8], EXAMPLES[8:]


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_a_seen_image_is_found_under_any_name_size_or_encoding(seen, how, tmp_path):
    prints, trained, _ = seen
    for i, path in enumerate(trained):
        copy = COPIES[how](Image.open(path).convert("RGB"))
        assert prints.copies_of(copy) == (["train"] if i < 6 else ["val"]), (how, path.name)


def test_other_lesions_are_not_copies(seen):
    prints, _, unseen = seen
    for path in unseen:
        d = prints.distances(Image.open(path).convert("RGB"))
        assert min(d.values()) > COPY_BITS, path.name
    # a crop that is not the centred square moves the thumbnail's content: documented as not found
    img = Image.open(EXAMPLES[0]).convert("RGB")
    w, h = img.size
    assert prints.copies_of(img.crop((int(0.15 * w), int(0.15 * h), w, h))) == []


def test_counts_by_path_and_unreadable_files_count_as_none(seen, tmp_path):
    prints, trained, unseen = seen
    renamed = []
    for i, p in enumerate(trained[:3] + unseen[:2]):
        q = tmp_path / f"x{i}.png"
        Image.open(p).resize((128, 128)).save(q)
        renamed.append(str(q))
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert count_copies(prints, [*renamed, str(tmp_path / "junk.jpg")]) == {"train": 3, "val": 0}


def test_round_trip_and_a_file_that_is_not_the_bundles_is_refused(seen, tmp_path):
    prints, _, _ = seen
    assert prints.counts == {"train": 6, "val": 2} and prints.missing == {"train": 0, "val": 0}
    sha = prints.save(tmp_path / "seen_images.npz")
    back = SeenImages.load(tmp_path / "seen_images.npz", sha256=sha)
    np.testing.assert_array_equal(back.hashes, prints.hashes)
    np.testing.assert_array_equal(back.role, prints.role)
    assert back.counts == prints.counts
    with pytest.raises(DataError, match="sha256 differs"):
        SeenImages.load(tmp_path / "seen_images.npz", sha256="0" * 64)
    (tmp_path / "bad.npz").write_bytes(b"PK not really")
    with pytest.raises(DataError, match="not a fingerprint file") as e:
        SeenImages.load(tmp_path / "bad.npz")
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "other.npz", hashes=np.zeros((2, 3)))
    with pytest.raises(DataError, match="not a fingerprint file"):
        SeenImages.load(tmp_path / "other.npz")


def test_a_listed_image_that_is_gone_is_counted_not_fatal(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    prints = fingerprint_images({"train": [str(EXAMPLES[0]), str(tmp_path / "gone.jpg"), str(tmp_path / "junk.jpg")]})
    assert prints.counts == {"train": 1, "val": 0} and prints.missing == {"train": 2, "val": 0}
    assert len(prints.hashes) == 2  # the image and its centred square (examples are 4:3)
