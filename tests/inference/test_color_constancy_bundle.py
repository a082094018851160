"""The serving path takes colour constancy from the bundle's metadata, like the rest of the
preprocessing: nothing in the predictor decides it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from melanoma_detector.inference import Predictor, default_bundle_dir
from melanoma_detector.preprocess import Preprocessing, preprocess_image

BUNDLE = default_bundle_dir()
pytestmark = pytest.mark.skipif(not (BUNDLE / "metadata.json").is_file(), reason=f"no model bundle at {BUNDLE}")


def test_bundle_metadata_switches_colour_constancy_on(tmp_path):
    copy = tmp_path / "bundle"
    copy.mkdir()
    for f in BUNDLE.iterdir():
        if f.is_file() and f.name != "metadata.json":
            (copy / f.name).symlink_to(f.resolve())
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    assert meta["preprocessing"].get("color_constancy", "none") == "none"
    meta["preprocessing"]["color_constancy"] = "shades_of_gray"
    (copy / "metadata.json").write_text(json.dumps(meta))

    image = min(p for p in (BUNDLE.parents[1] / "examples").iterdir() if p.suffix == ".jpg")
    plain, sog = Predictor(BUNDLE), Predictor(copy)
    assert sog.pp == Preprocessing.from_dict(meta["preprocessing"]) and sog.pp.color_constancy == "shades_of_gray"
    from melanoma_detector.data.io import load_image

    arr, reason = sog.image_prep().load(str(image))
    assert reason is None and np.array_equal(arr, preprocess_image(load_image(image), sog.pp))
    assert not np.array_equal(arr, plain.image_prep().load(str(image))[0])
    a, b = plain.predict(image), sog.predict(image)
    assert a["status"] == b["status"] == "ok"
    assert a["probability_malignant"] != b["probability_malignant"]


def test_model_card_names_colour_constancy_only_when_on(tmp_path):
    from melanoma_detector.export.model_card import write_model_card

    meta = json.loads((BUNDLE / "metadata.json").read_text())
    (tmp_path / "plain").mkdir()
    (tmp_path / "sog").mkdir()
    assert "colour constancy" not in write_model_card(tmp_path / "plain", meta).read_text()
    meta["preprocessing"]["color_constancy"] = "shades_of_gray"
    assert "Shades-of-Grey colour constancy (p = 6)" in write_model_card(tmp_path / "sog", meta).read_text()
