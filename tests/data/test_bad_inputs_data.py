"""The bad-input corpus (tests/badinputs.py) through the decoder, `data check` and the training
loader: every bad file is refused with a one-line reason naming it; odd but valid images (alpha,
palette, greyscale, CMYK, 16-bit, EXIF-rotated) become the right upright 8-bit RGB image."""

from __future__ import annotations

import io
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinputs import BY_NAME, cases, example_image, expected_size, png_bomb, unreadable_skip_reason
from melanoma_detector.data.io import load_image, to_rgb
from melanoma_detector.errors import DataError, ImageDecodeError

# The 1x-2x bomb makes Pillow warn before the decoder refuses it: expected.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

def _skip_if_readable(path: Path) -> None:
    if path.name == "no-permission.jpg" and (reason := unreadable_skip_reason(path)):
        pytest.skip(reason)


def _one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("case", cases("undecodable"), ids=lambda c: c.name)
def test_undecodable_file_is_one_line_error_naming_it(bad_corpus, case):
    path = case.path(bad_corpus / "benign")
    _skip_if_readable(path)
    with pytest.raises(ImageDecodeError) as exc:
        load_image(path)
    message = _one_line(str(exc.value))
    assert message.startswith(f"{path}: ") and case.words in message, message
    assert exc.value.reason in message and isinstance(exc.value, DataError)


@pytest.mark.parametrize("case", [c for c in cases("undecodable") if c.name not in ("folder.jpg", "no-permission.jpg")],
                         ids=lambda c: c.name)
def test_undecodable_bytes_named_by_caller(bad_corpus, case):
    with pytest.raises(ImageDecodeError) as exc:
        load_image(case.path(bad_corpus / "benign").read_bytes(), name="upload.jpg")
    message = _one_line(str(exc.value))
    assert message.startswith("upload.jpg: ") and case.words in message, message


@pytest.mark.parametrize("case", cases("accepted") + cases("gate"), ids=lambda c: c.name)
def test_valid_odd_images_decode_to_upright_rgb(bad_corpus, case):
    path = case.path(bad_corpus / "benign")
    for source in (path, path.read_bytes()):
        img = load_image(source)
        assert img.mode == "RGB"
        assert img.size == (case.size or expected_size(case.name))


def _decoded(bad_corpus, name: str) -> np.ndarray:
    return np.asarray(load_image(bad_corpus / "benign" / name), dtype=np.float64)


def test_colour_conversions_match_the_original(bad_corpus):
    """Alpha (opaque), palette and CMYK decode to the colours of the RGB image they were made from."""
    base = np.asarray(example_image(), dtype=np.float64)
    assert np.abs(_decoded(bad_corpus, "alpha.png") - base).max() == 0
    assert np.abs(_decoded(bad_corpus, "palette.png") - base).mean() < 6  # 256-colour quantisation
    assert np.abs(_decoded(bad_corpus, "cmyk.jpg") - base).mean() < 4  # JPEG loss only, no inverted channels
    grey = _decoded(bad_corpus, "grey.png")
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_sixteen_bit_is_rescaled_not_clipped(bad_corpus):
    """A 16-bit greyscale PNG: Pillow's own convert("RGB") clips every value over 255 to white; the
    decoder scales it at full 16-bit scale, so it decodes exactly as the 8-bit greyscale original."""
    raw = Image.open(bad_corpus / "benign" / "sixteen-bit.png")
    assert raw.mode.startswith("I;16") and np.asarray(raw).max() > 255
    assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.99  # what a naive decoder returns: white
    out = _decoded(bad_corpus, "sixteen-bit.png")
    assert np.array_equal(out, _decoded(bad_corpus, "grey.png"))
    assert len(np.unique(out)) > 50


@pytest.mark.parametrize("mode", ["I", "F"])
def test_signed_and_float_greyscale_are_rescaled(mode):
    arr = np.linspace(-1000, 70000, 64 * 48).reshape(48, 64)
    img = to_rgb(Image.fromarray(arr.astype(np.int32 if mode == "I" else np.float32)))
    out = np.asarray(img)[..., 0].astype(int)
    assert img.mode == "RGB" and out.min() == 0 and out.max() == 255
    assert (np.diff(out.ravel()) >= 0).all()  # monotonic: no wrap-around of negative values


def test_exif_rotation_is_applied(bad_corpus):
    """Orientation 6 = stored landscape, shown rotated 90 degrees clockwise."""
    stored = Image.open(bad_corpus / "benign" / "exif-rotated.jpg")
    assert stored.getexif().get(0x0112) == 6
    w, h = stored.size
    upright = load_image(bad_corpus / "benign" / "exif-rotated.jpg")
    assert upright.size == (h, w)
    expected = np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    assert np.abs(np.asarray(upright, dtype=np.float64) - expected).max() == 0


def test_other_pillow_formats_are_refused():
    """Only JPEG, PNG, BMP, TIFF and WebP are decoded: Pillow's other readers never see uploads."""
    for fmt in ("GIF", "ICO", "PPM", "TGA"):
        buf = io.BytesIO()
        Image.new("RGB", (80, 80), (120, 80, 60)).save(buf, format=fmt)
        with pytest.raises(ImageDecodeError, match="expected JPEG, PNG, BMP, TIFF or WebP"):
            load_image(buf.getvalue(), name=f"x.{fmt.lower()}")


def test_bomb_refused_in_threads_without_touching_warning_filters():
    """Between 1x and 2x Image.MAX_IMAGE_PIXELS Pillow only warns. The decoder refuses such images
    from any thread, whatever the warning filters say, and leaves the filters as they were. (It used
    warnings.catch_warnings(), which swaps process-wide state: decoding in threads left its "error"
    filter behind for the whole process.)"""
    bomb = png_bomb(10_000, 10_000, rows=2)  # header only: 100M pixels declared
    good = io.BytesIO()
    example_image().resize((2000, 1500)).save(good, format="JPEG")  # slow enough for threads to interleave
    errors, sizes, failures = [], [], []

    def worker():
        for _ in range(5):
            try:
                load_image(bomb)
                failures.append("bomb decoded")
            except ImageDecodeError as exc:
                errors.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - anything else is the failure under test
                failures.append(repr(exc))
            sizes.append(load_image(good.getvalue()).size)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a host application that silences warnings
        expected = list(warnings.filters)
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert list(warnings.filters) == expected
    assert not failures, failures[:3]
    assert len(errors) == 30 and all("too large" in e for e in errors), errors[:3]
    assert sizes == [(2000, 1500)] * 30


def test_bomb_refused_when_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="too large"):
            load_image(png_bomb(10_000, 10_000, rows=2))


# --------------------------------------------------------------------------- data check


def test_data_check_reports_every_bad_file(bad_corpus, tmp_path, capsys):
    from melanoma_detector.cli import main

    assert main(["data", "check", str(bad_corpus), "--out", str(tmp_path / "out"), "--no-progress"]) in (0, 1)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    unreadable = {Path(u["path"]).name: u["reason"] for u in report["unreadable"]}
    expected = {c.name for c in cases("undecodable")} - {"folder.jpg"}  # a folder is searched, not a file
    if unreadable_skip_reason(bad_corpus / "benign" / "no-permission.jpg"):
        expected.discard("no-permission.jpg")
    assert set(unreadable) == expected
    for name, reason in unreadable.items():
        assert BY_NAME[name].words in reason.lower() and "\n" not in reason, (name, reason)
    assert report["summary"]["readable"] == report["summary"]["images"] - len(expected)
    assert f"unreadable: {len(expected)}" in captured.out
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(f"benign/{name}" in md for name in expected)


# --------------------------------------------------------------------------- training loader


def _samples(bad_corpus):
    from melanoma_detector.data.discovery import discover

    return discover(bad_corpus)


def test_training_loader_stops_on_first_bad_file_without_skip(bad_corpus):
    pytest.importorskip("torch")
    from melanoma_detector.data.dataset import validate_images

    source = _samples(bad_corpus)
    with pytest.raises(DataError) as exc:
        validate_images(source.samples, skip_bad=False, non_images=source.non_images, progress=False)
    message = _one_line(str(exc.value))
    bad_names = {c.name for c in cases("undecodable")}
    named = [n for n in bad_names if f"benign/{n}: " in message]
    assert len(named) == 1 and "--skip-bad-images" in message and "more)" in message, message


def test_training_loader_skips_and_counts_with_skip(bad_corpus):
    pytest.importorskip("torch")
    from melanoma_detector.data.dataset import ImageDataset, validate_images
    from melanoma_detector.data.transforms import build_transforms
    from melanoma_detector.preprocess import Preprocessing

    source = _samples(bad_corpus)
    good, bad = validate_images(source.samples, skip_bad=True, non_images=source.non_images, progress=False)
    undecodable = {c.name for c in cases("undecodable")} - {"folder.jpg"}
    if unreadable_skip_reason(bad_corpus / "benign" / "no-permission.jpg"):
        undecodable.discard("no-permission.jpg")
    assert len(bad) == len(undecodable)
    assert {Path(s.path).name for s in good} == {Path(s.path).name for s in source.samples} - undecodable
    pp = Preprocessing(input_size=32)
    for train in (False, True):
        ds = ImageDataset(good, build_transforms(pp, train=train))
        for i in range(len(ds)):
            x, _, _ = ds[i]
            assert tuple(x.shape) == (3, 32, 32) and bool(x.isfinite().all())
    # Without validation, a bad file fails at load time with the same one-line error naming it.
    bad_sample = next(s for s in source.samples if Path(s.path).name == "truncated.jpg")
    with pytest.raises(ImageDecodeError, match="truncated.jpg: cannot decode image"):
        ImageDataset([bad_sample], build_transforms(pp, train=False))[0]


def test_unreadable_file_even_as_root(bad_corpus, tmp_path, monkeypatch):
    """The chmod-000 case skips under root (root reads anything); simulate the PermissionError the
    OS raises for everyone else, in the decoder and in data check's own read."""
    import pathlib

    from melanoma_detector.data.check import check_dataset

    real_open = pathlib.Path.open

    def deny(self, *args, **kwargs):
        if self.name == "no-permission.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", deny)
    path = bad_corpus / "benign" / "no-permission.jpg"
    with pytest.raises(ImageDecodeError, match="no-permission.jpg: permission denied"):
        load_image(path)
    report = check_dataset(bad_corpus, out_dir=tmp_path / "out", progress=False, max_workers=1, sample_grid=0)
    reasons = {Path(u["path"]).name: u["reason"] for u in report["unreadable"]}
    assert "permission denied" in reasons["no-permission.jpg"].lower()
