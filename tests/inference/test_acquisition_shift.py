"""benchmarks/acquisition_shift.py scores what the Predictor serves, and its shifts are the
advertised image-level changes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from melanoma_detector.data.io import load_image
from melanoma_detector.inference import Predictor, default_bundle_dir

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = default_bundle_dir()
pytestmark = pytest.mark.skipif(not (BUNDLE / "metadata.json").is_file(), reason=f"no model bundle at {BUNDLE}")
sys.path.insert(0, str(ROOT / "benchmarks"))
from acquisition_shift import SHIFTS, score  # noqa: E402 - the benchmark folder joins sys.path first


def test_unshifted_scores_are_the_served_probabilities():
    predictor = Predictor(BUNDLE)
    paths = sorted(str(p) for p in (ROOT / "examples").glob("*.jpg"))
    served = [r["probability_malignant"] for r in predictor.predict_paths(paths)]
    scored = score(predictor, [load_image(p) for p in paths], SHIFTS["none"], batch_size=5)
    np.testing.assert_allclose(scored, served, atol=1e-6)


def test_shifts_keep_size_and_change_pixels():
    img = load_image(min((ROOT / "examples").glob("*.jpg")))
    base = np.asarray(img, np.int16)
    for name, shift in SHIFTS.items():
        out = shift(img)
        assert out.size == img.size and out.mode == "RGB", name
        diff = np.abs(np.asarray(out, np.int16) - base).mean()
        assert (diff == 0) == (name == "none"), (name, diff)
    warm = np.asarray(SHIFTS["warm cast (R x1.15, B x0.85)"](img), np.float64).mean((0, 1))
    assert warm[0] > base[..., 0].mean() and warm[2] < base[..., 2].mean()
