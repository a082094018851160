"""Fuzzing decode + preprocess: 2,000 mutated image byte strings (bit flips, truncation, byte
insertion and deletion, header splices) from small valid JPEG/PNG/BMP/WebP/TIFF seeds. Only
ImageDecodeError may escape `load_image`, preprocessing never fails on what it accepted, and no
input takes more than 2 s. Deterministic (derandomize), so a failure reproduces on every run."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from melanoma_detector.data.io import load_image
from melanoma_detector.errors import ImageDecodeError
from melanoma_detector.preprocess import Preprocessing, preprocess_image

# Pillow warns about what it could still read (corrupt EXIF, a 1x-2x bomb header): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin",
                                        "ignore::PIL.Image.DecompressionBombWarning")

EXAMPLES = 2000
MAX_SECONDS = 2.0
PP = Preprocessing(input_size=64)


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    out = []

    def save(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())

    exif = Image.Exif()
    exif[0x0112] = 6
    save(rgb, "JPEG", quality=80, exif=exif.tobytes())
    save(rgb.convert("L"), "JPEG", quality=80, progressive=True)
    save(rgb.convert("CMYK"), "JPEG")
    save(rgb.convert("RGBA"), "PNG")
    save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")
    save(Image.fromarray((rng.integers(0, 4096, (12, 16))).astype("<u2")), "PNG")
    save(rgb, "BMP")
    save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "BMP")
    save(rgb, "WEBP", quality=70)
    save(rgb.convert("RGBA"), "WEBP", lossless=True)
    save(rgb, "TIFF", compression="tiff_lzw")
    return out


SEEDS = _seeds()


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "overwrite"]))
        n = len(data)
        if n == 0:
            break
        # Headers hold the interesting fields (sizes, offsets, chunk lengths): aim there half the time,
        # past the first 4 bytes (a broken signature only tests "not a recognised image").
        pos = draw(st.one_of(st.integers(min(4, n - 1), min(n, 96) - 1), st.integers(0, n - 1)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[max(pos, 1):]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "splice":  # another seed's header over this body
            other = SEEDS[draw(st.integers(0, len(SEEDS) - 1))]
            k = draw(st.integers(1, min(len(other), 64)))
            data[:k] = other[:k]
        else:  # extreme values in a field: 0x00.., 0xFF.., 0x7F..
            fill = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x80"])) * draw(st.integers(1, 4))
            data[pos : pos + len(fill)] = fill
    return bytes(data)


def decode_and_preprocess(data: bytes):
    """What the REST API does with an upload before the model: decode, then preprocess."""
    try:
        img = load_image(data, name="fuzz.bin")
    except ImageDecodeError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz.bin: ") and "\n" not in msg, msg
        return None
    assert img.mode == "RGB" and min(img.size) >= 1
    arr = preprocess_image(img, PP)
    assert arr.shape == (3, PP.input_size, PP.input_size) and np.isfinite(arr).all()
    return arr


def test_seeds_decode():
    for data in SEEDS:
        assert decode_and_preprocess(data) is not None


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_image())
def test_mutated_images_fail_cleanly_and_fast(data):
    t0 = time.perf_counter()
    decode_and_preprocess(data)
    elapsed = time.perf_counter() - t0
    assert elapsed < MAX_SECONDS, f"{elapsed:.2f} s for a {len(data)}-byte input"
