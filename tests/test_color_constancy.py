"""Shades-of-Grey colour constancy in the shared preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from melanoma_detector.config import ModelConfig
from melanoma_detector.errors import UserError
from melanoma_detector.preprocess import Preprocessing, preprocess_image, shades_of_gray


def _skin(rng: np.random.Generator) -> np.ndarray:
    """A skin-toned image with a darker blob, kept well below 1 so a cast cannot clip it."""
    yy, xx = np.mgrid[0:72, 0:96]
    blob = np.exp(-(((xx - 48) / 20.0) ** 2 + ((yy - 36) / 15.0) ** 2))
    base = np.stack([0.75 - 0.4 * blob, 0.55 - 0.35 * blob, 0.45 - 0.3 * blob], axis=-1)
    return (base + rng.normal(0, 0.02, base.shape)).clip(0.05, 0.8).astype(np.float32)


def test_a_global_colour_cast_is_removed():
    """Two dermatoscopes with another white balance: the same scene times per-channel gains."""
    img = _skin(np.random.default_rng(0))
    cast = img * np.asarray([0.8, 1.0, 1.2], np.float32)
    a, b = shades_of_gray(cast), shades_of_gray(img)
    # The illuminant's colour goes; its intensity stays, so the two agree up to one global factor.
    ratio = a / b
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-4)
    # ...and it really changed the image: the warm skin tone is pulled towards grey.
    out = shades_of_gray(img)
    assert np.ptp(out.reshape(-1, 3).mean(0)) < np.ptp(img.reshape(-1, 3).mean(0))


def test_neutral_and_black_images_pass_unchanged():
    grey = np.full((8, 8, 3), 0.4, np.float32)
    np.testing.assert_allclose(shades_of_gray(grey), grey, atol=1e-6)
    black = np.zeros((8, 8, 3), np.float32)
    assert np.array_equal(shades_of_gray(black), black)
    one_channel = np.zeros((8, 8, 3), np.float32)
    one_channel[..., 0] = 0.5  # pure red: green and blue have no illuminant to divide by
    out = shades_of_gray(one_channel)
    assert np.isfinite(out).all() and (out[..., 1:] == 0).all()


def test_preprocessing_applies_it_only_when_asked():
    rng = np.random.default_rng(1)
    img = Image.fromarray((_skin(rng) * 255).astype(np.uint8))
    plain = Preprocessing(input_size=64)
    sog = Preprocessing(input_size=64, color_constancy="shades_of_gray")
    a, b = preprocess_image(img, plain), preprocess_image(img, sog)
    assert a.shape == b.shape == (3, 64, 64) and a.dtype == b.dtype == np.float32
    assert np.abs(a - b).max() > 0.1


def test_saved_preprocessing_round_trips_and_older_files_mean_none():
    sog = Preprocessing(input_size=64, color_constancy="shades_of_gray")
    assert Preprocessing.from_dict(sog.to_dict()) == sog
    old = {k: v for k, v in Preprocessing(input_size=64).to_dict().items() if k != "color_constancy"}
    assert Preprocessing.from_dict(old).color_constancy == "none"


def test_unknown_methods_are_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match="accepted: none, shades_of_gray"):
        Preprocessing(input_size=64, color_constancy="gray_world")
    with pytest.raises(UserError, match="model.color_constancy: 'retinex' is not one of none, shades_of_gray"):
        ModelConfig(color_constancy="retinex")
