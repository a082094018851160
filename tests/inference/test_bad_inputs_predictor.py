"""The bad-input corpus through the torch-free Predictor: `predict_paths`, `predict` on a path, on
bytes and on a PIL image. Nothing raises; bad files get status cannot_assess with a one-line
reason naming the file; odd but valid images are scored."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinputs import BY_NAME, CORPUS, cases, example_image, refused_only_for_colour, unreadable_skip_reason
from melanoma_detector.inference import Predictor, default_bundle_dir

BUNDLE = default_bundle_dir()
pytestmark = [pytest.mark.skipif(not (BUNDLE / "metadata.json").is_file(), reason=f"no model bundle at {BUNDLE}"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]  # before the refusal


@pytest.fixture(scope="module")
def predictor():
    return Predictor(BUNDLE)


def _expected_status(case) -> str:
    return "ok" if case.kind == "accepted" else "cannot_assess"


def _check(result, case, shown_name: str):
    reason = result["reason"]
    assert "\n" not in reason and "Traceback" not in reason
    if refused_only_for_colour(case, result["status"], reason):
        assert result["probability_malignant"] is None
        return
    assert result["status"] == _expected_status(case), (case.name, reason)
    if case.kind == "accepted":
        assert 0 <= result["probability_malignant"] <= 1 and result["risk_level"] in ("Low", "Moderate", "High")
        return
    assert result["probability_malignant"] is None and result["predicted_label"] is None
    assert case.words in reason, (case.name, reason)
    if case.kind == "undecodable":
        assert reason.startswith(f"{shown_name}: "), reason
    else:  # the size gate says what is needed
        assert "at least 64 px" in reason
    assert result["recommendation"].startswith("Cannot assess this image: ")


def test_predict_paths_answers_every_file(predictor, bad_corpus):
    corpus = bad_corpus / "benign"
    skip = unreadable_skip_reason(corpus / "no-permission.jpg")
    names = [c.name for c in CORPUS if not (skip and c.name == "no-permission.jpg")]
    results = predictor.predict_paths([str(corpus / n) for n in names], batch_size=4)
    assert [Path(r["path"]).name for r in results] == names
    for name, result in zip(names, results):
        _check(result, BY_NAME[name], str(corpus / name))


@pytest.mark.parametrize("case", [c for c in CORPUS if c.name not in ("folder.jpg", "no-permission.jpg")],
                         ids=lambda c: c.name)
def test_predict_bytes_uses_the_callers_name(predictor, bad_corpus, case):
    data = case.path(bad_corpus / "benign").read_bytes()
    result = predictor.predict(data, name=case.name)
    _check(result, case, case.name)
    assert "<bytes>" not in result["reason"] and str(bad_corpus) not in result["reason"]


def test_predict_temp_path_is_not_shown(predictor, bad_corpus):
    """The web page passes a temporary upload path and the original name; the reason shows the name."""
    result = predictor.predict(str(bad_corpus / "benign" / "truncated.jpg"), name="my-mole.jpg")
    assert result["reason"].startswith("my-mole.jpg: cannot decode image") and str(bad_corpus) not in result["reason"]
    assert predictor.predict(b"", name=None)["reason"].startswith("<upload>: empty file")


def test_predict_missing_and_directory_paths(predictor, tmp_path):
    for path, words in ((tmp_path / "nope.jpg", "file not found"), (tmp_path, "is a directory")):
        result = predictor.predict(str(path))
        assert result["status"] == "cannot_assess" and words in result["reason"], result["reason"]


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "I", "F", "1", "LA", "YCbCr"])
def test_predict_pil_image_in_any_mode(predictor, mode):
    base = example_image()
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype("<u2"))
    elif mode == "P":  # the default web palette with dithering looks unlike dermoscopy to the gate
        img = base.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = base.convert(mode)
    result = predictor.predict(img, name=f"{mode}.png")
    # 1-bit or greyscale may fall outside the model's input gate; either way a clean answer
    assert result["status"] in ("ok", "cannot_assess"), result
    if mode in ("RGBA", "P", "CMYK", "YCbCr"):
        assert result["status"] == "ok", result["reason"]
    else:
        assert result["status"] == "ok" or "does not look like" in result["reason"], result["reason"]


def test_odd_modes_score_like_the_rgb_original(predictor, bad_corpus):
    """Alpha (opaque), palette, CMYK and EXIF-rotated copies of one image get close probabilities."""
    buf = io.BytesIO()
    example_image().save(buf, format="PNG")
    reference = predictor.predict(buf.getvalue())["probability_malignant"]
    for name in ("alpha.png", "palette.png", "cmyk.jpg", "exif-rotated.jpg"):
        p = predictor.predict(str(bad_corpus / "benign" / name))["probability_malignant"]
        assert abs(p - reference) < 0.05, (name, p, reference)


def test_gate_results_in_batch(predictor, bad_corpus):
    corpus = bad_corpus / "benign"
    paths = [str(corpus / c.name) for c in cases("gate")] + [str(bad_corpus / "malignant" / "good.jpg")]
    results = predictor.predict_paths(paths)
    assert [r["status"] for r in results] == ["cannot_assess", "cannot_assess", "ok"]
