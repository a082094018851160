"""The heatmap is drawn over the part of the image the model saw, not stretched over the whole image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from melanoma_detector.inference.predictor import overlay_heatmap
from melanoma_detector.preprocess import MAX_ASPECT, Preprocessing, crop_box, resize_and_crop


def _ramp(w: int, h: int, axis: int) -> Image.Image:
    """A greyscale image whose value is the pixel's x (axis 1) or y (axis 0) coordinate, scaled to 0-255."""
    n = w if axis == 1 else h
    line = np.linspace(0, 255, n)
    a = np.broadcast_to(line[None, :] if axis == 1 else line[:, None], (h, w))
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("mode", ["crop", "squash"])
@pytest.mark.parametrize("size", [(200, 150), (150, 200), (256, 256), (1000, 90), (90, 1000), (4 * MAX_ASPECT * 20, 20)])
def test_crop_box_is_where_resize_and_crop_cuts(size, mode):
    pp = Preprocessing(input_size=64, crop_pct=0.875, resize_mode=mode, interpolation="bilinear")
    w, h = size
    box = crop_box(size, pp)
    assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    for axis, (lo, hi), n in ((1, (box[0], box[2]), w), (0, (box[1], box[3]), h)):
        out = np.asarray(resize_and_crop(_ramp(w, h, axis), pp), np.float64)[..., 0]
        edge = out[:, [0, -1]].mean(axis=0) if axis == 1 else out[[0, -1], :].mean(axis=1)
        # the first and last pixel centres of the crop sit half a source step inside its edges
        step = (hi - lo) / pp.input_size
        expected = np.array([lo + step / 2, hi - step / 2]) * 255 * n / (n - 1) - 255 / (n - 1) / 2
        assert np.allclose(edge, expected, atol=255 / n * 1.5 + 1), (axis, edge, expected)


def test_overlay_puts_the_heat_inside_the_crop_and_dims_the_rest():
    img = Image.new("RGB", (200, 150), (128, 128, 128))
    cam = np.zeros((6, 6), np.float32)
    cam[0, 0] = 1.0  # heat in the top-left cell of what the model saw
    box = (0.17, 0.06, 0.83, 0.94)
    out = np.asarray(overlay_heatmap(img, cam, opacity=1.0, box=box), np.float64)
    base = np.asarray(img, np.float64)
    x0, y0, x1, y1 = round(0.17 * 200), round(0.06 * 150), round(0.83 * 200), round(0.94 * 150)
    outside = np.ones((150, 200), bool)
    outside[y0:y1, x0:x1] = False
    assert np.all(out[outside] < base[outside])  # dimmed, and no heat colour there
    assert np.ptp(out[outside], axis=0).max() == 0
    hot = np.unravel_index(np.argmax(np.abs(out - base).sum(-1) * ~outside), outside.shape)
    assert y0 <= hot[0] < y0 + (y1 - y0) / 6 + 2 and x0 <= hot[1] < x0 + (x1 - x0) / 6 + 2


def test_the_default_box_is_the_whole_image():
    img = Image.new("RGB", (40, 30), (50, 100, 150))
    cam = np.random.default_rng(0).random((6, 6)).astype(np.float32)
    assert np.array_equal(np.asarray(overlay_heatmap(img, cam)),
                          np.asarray(overlay_heatmap(img, cam, box=(0.0, 0.0, 1.0, 1.0))))


def test_a_prediction_carries_the_box_its_heatmap_belongs_to(tmp_path):
    pytest.importorskip("onnxruntime")
    from melanoma_detector.inference import Predictor

    repo = Path(__file__).parents[2]
    predictor = Predictor(repo / "models" / "default")
    example = sorted((repo / "examples").glob("malignant_*.jpg"))[0]
    r = predictor.predict(str(example), heatmap=True)
    assert r["status"] == "ok"
    assert tuple(r["heatmap_box"]) == crop_box(r["image"].size, predictor.pp)
    assert r["heatmap_box"][0] > 0.1  # HAM10000 is 4:3: the model sees the centre, not the sides

    # an image the caller opened: EXIF orientation applied, as for the file
    img = Image.open(example)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = tmp_path / "rotated.jpg"
    img.save(rotated, exif=exif, quality=95)
    from_file = predictor.predict(str(rotated))
    from_pil = predictor.predict(Image.open(rotated))
    assert from_pil["probability_malignant"] == from_file["probability_malignant"]


def test_tta_is_the_mean_calibrated_probability_of_the_eight_views():
    pytest.importorskip("onnxruntime")
    from melanoma_detector.inference import Predictor
    from melanoma_detector.inference.predictor import dihedral_views

    repo = Path(__file__).parents[2]
    predictor = Predictor(repo / "models" / "default")
    example = sorted((repo / "examples").glob("malignant_*.jpg"))[0]
    _, arr = predictor.prepare(str(example))
    views = np.stack(dihedral_views(arr))
    assert len({v.tobytes() for v in views}) == 8  # eight distinct views
    expected = predictor.calibrate(predictor.run(views)["logit"]).mean()
    got = predictor.predict(str(example), tta=True)["probability_malignant"]
    assert got == pytest.approx(expected, abs=1e-9)
    assert abs(got - predictor.predict(str(example))["probability_malignant"]) > 1e-4
