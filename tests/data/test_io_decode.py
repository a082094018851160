"""data/io.py decoding: pixels identical to the plain Pillow pipeline (training/serving parity), no
needless full-size copies of the picture, and 16-bit greyscale at full scale."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from melanoma_detector.data.io import load_image, to_rgb, upright
from melanoma_detector.inference.predictor import ImagePrep
from melanoma_detector.preprocess import Preprocessing

ORIENTATION = 0x0112


def _picture(w: int = 120, h: int = 90) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _reference(data: bytes) -> np.ndarray:
    """The decoder as it was: exif_transpose (a copy), alpha composited on black, convert("RGB")."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img) or img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


def _cases() -> dict[str, bytes]:
    base = _picture()
    rng = np.random.default_rng(1)
    rgba = np.dstack([np.asarray(base), rng.integers(0, 256, base.size[::-1], dtype=np.uint8)])
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE)
    cases = {
        "rgb.png": _encode(base, "PNG"),
        "rgb.jpg": _encode(base, "JPEG", quality=92),
        "rgba.png": _encode(Image.fromarray(rgba), "PNG"),
        "palette.png": _encode(palette, "PNG"),
        "palette-transparent.png": _encode(palette, "PNG", transparency=3),
        "grey.png": _encode(base.convert("L"), "PNG"),
        "cmyk.jpg": _encode(base.convert("CMYK"), "JPEG"),
        "rotated.png": _encode(base, "PNG", exif=_exif(6)),
    }
    for o in range(1, 9):
        cases[f"exif-{o}.jpg"] = _encode(base, "JPEG", quality=92, exif=_exif(o))
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_pixels_identical_to_plain_pillow_pipeline(name, tmp_path):
    data = CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    expected = _reference(data)
    for source in (data, path):
        out = load_image(source)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), expected)
    # a caller's own (unrotated) image, through the predictor's decode step
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        prepared, _ = ImagePrep(Preprocessing(input_size=32)).prepare(img)
    np.testing.assert_array_equal(np.asarray(prepared), expected)


def test_exif_rotated_jpeg_is_rotated():
    out = load_image(CASES["exif-6.jpg"])
    assert out.size == (90, 120)
    assert ORIENTATION not in out.getexif()  # upright now: turning it again is a no-op
    assert upright(out) is out


@pytest.fixture
def copies(monkeypatch) -> list[str]:
    """Records every whole-image copy Pillow makes through Image.copy/convert/transpose."""
    calls: list[str] = []
    for method in ("copy", "convert", "transpose"):
        original = getattr(Image.Image, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Image.Image, method, spy)
    return calls


@pytest.mark.parametrize("name", ["rgb.jpg", "rgb.png", "exif-1.jpg", "exif-6.jpg", "exif-3.jpg"])
def test_rgb_file_is_decoded_without_a_copy(name, copies):
    """An RGB file is held once: no exif_transpose copy, no convert("RGB") copy of an RGB image
    (a 48-megapixel photo is ~180 MB per copy); a rotated one is turned in place."""
    out = load_image(CASES[name])
    assert out.mode == "RGB" and copies == []


def test_to_rgb_returns_rgb_image_itself_and_converts_others():
    rgb = _picture()
    assert to_rgb(rgb) is rgb
    grey = rgb.convert("L")
    out = to_rgb(grey)
    assert out is not grey and out.mode == "RGB"


def test_callers_image_is_not_modified():
    """The predictor turns a caller's EXIF-rotated image upright on a copy, leaving theirs as it was."""
    with Image.open(io.BytesIO(CASES["exif-6.jpg"])) as img:
        img.load()
        before = np.asarray(img).copy()
        prepared, _ = ImagePrep(Preprocessing(input_size=32)).prepare(img)
        assert img.size == (120, 90) and img.getexif().get(ORIENTATION) == 6
        np.testing.assert_array_equal(np.asarray(img), before)
    assert prepared.size == (90, 120)
    np.testing.assert_array_equal(np.asarray(prepared), _reference(CASES["exif-6.jpg"]))


# --------------------------------------------------------------------------- 16-bit greyscale


def _grey() -> np.ndarray:
    rng = np.random.default_rng(2)
    grey = rng.integers(20, 200, (48, 64)).astype(np.uint8)
    grey[0, :4] = (0, 1, 2, 3)  # no 255: a dim picture (max 199)
    return grey


@pytest.mark.parametrize("dtype,fmt", [("<u2", "PNG"), ("<u2", "TIFF"), (">u2", "TIFF")])
def test_sixteen_bit_greyscale_is_full_scale(dtype, fmt):
    """The same picture saved as 8-bit L and as 16-bit (x257) decodes to the same pixels; a dim
    16-bit picture is not stretched by its own maximum (16-bit RGB and LA are not either)."""
    grey = _grey()
    eight = load_image(_encode(Image.fromarray(grey), "PNG"))
    sixteen = Image.fromarray((grey.astype(np.uint16) * 257).astype(dtype))
    assert sixteen.mode.startswith("I;16")
    data = _encode(sixteen, fmt)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(eight))
    np.testing.assert_array_equal(np.asarray(to_rgb(sixteen)), np.asarray(eight))


def test_sixteen_bit_rounds_to_nearest():
    values = np.array([[0, 128, 129, 257, 385, 386, 65406, 65407, 65535]], dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    np.testing.assert_array_equal(out, np.rint(values / 257).astype(np.uint8))
    np.testing.assert_array_equal(out, [[0, 0, 1, 1, 1, 2, 254, 255, 255]])


def test_twelve_bit_data_in_a_sixteen_bit_file_is_scaled_by_its_own_depth():
    """12-bit sensor data (max <= 4095) in an I;16 file: 4095 -> 255, not left nearly black (it was
    once scaled as 16-bit, which turned a scored picture into a refused "nearly uniform" one)."""
    grey = _grey()
    twelve = Image.fromarray((grey.astype(np.uint16) * 16).astype("<u2"))
    out = np.asarray(to_rgb(twelve))[..., 0].astype(int)
    assert np.abs(out - grey).max() <= 1
    full = Image.fromarray(np.array([[0, 4095, 2048]], dtype=np.uint16))
    np.testing.assert_array_equal(np.asarray(to_rgb(full))[..., 0], [[0, 255, 128]])
