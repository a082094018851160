"""Training augmentation: every preset gives the model's input, "strong" really erases, and
"acquisition"'s device shifts really shift."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from melanoma_detector.data.transforms import RandomChannelGains, RandomJpeg, build_transforms
from melanoma_detector.preprocess import Preprocessing

PP = Preprocessing(input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=0.875)


def _image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8))


def _has_erased_patch(x: torch.Tensor) -> bool:
    # A normalised uint8 pixel is never exactly 0 ((v/255 - 0.5)/0.5 = 0 needs v = 127.5), so an
    # all-zero 4x4 block in every channel can only be the erased patch.
    zero = (x == 0).all(dim=0).float()[None, None]
    return bool((torch.nn.functional.avg_pool2d(zero, 4, stride=1) == 1).any())


@pytest.mark.parametrize("augmentation", ["standard", "strong", "acquisition"])
def test_training_transform_gives_the_model_input(augmentation):
    x = build_transforms(PP, train=True, augmentation=augmentation)(_image())
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -1.01 <= float(x.min()) and float(x.max()) <= 1.01


def test_acquisition_augmentation_casts_colours_and_standard_keeps_them():
    """The acquisition set's per-channel gains tint a grey image; the standard set's colour jitter (brightness,
    contrast, saturation, a small hue shift) cannot turn neutral grey into a colour."""
    from PIL import Image

    random.seed(0)
    torch.manual_seed(0)
    grey = Image.new("RGB", (80, 60), (128, 128, 128))
    tinted = {}
    for name in ("acquisition", "standard"):
        t = build_transforms(PP, train=True, augmentation=name)
        tinted[name] = sum(float((x.amax(dim=0) - x.amin(dim=0)).mean()) > 0.02 for x in (t(grey) for _ in range(30)))
    assert tinted["acquisition"] >= 15 and tinted["standard"] == 0  # gains with p = 0.8


def test_strong_augmentation_erases_a_patch_and_standard_never_does():
    random.seed(0)
    torch.manual_seed(0)
    img = _image()
    strong = build_transforms(PP, train=True, augmentation="strong")
    standard = build_transforms(PP, train=True, augmentation="standard")
    erased = sum(_has_erased_patch(strong(img)) for _ in range(40))
    assert 5 <= erased <= 35  # p = 0.5
    assert not any(_has_erased_patch(standard(img)) for _ in range(20))


def test_unknown_augmentation_names_the_accepted_ones():
    with pytest.raises(ValueError, match="standard, strong, acquisition"):
        build_transforms(PP, train=True, augmentation="extreme")


def test_channel_gains_cast_the_white_balance_within_their_range():
    random.seed(1)
    grey = Image.new("RGB", (16, 16), (100, 100, 100))
    casts = [np.asarray(RandomChannelGains(p=1.0, max_change=0.15)(grey), np.float64)[0, 0] for _ in range(50)]
    casts = np.asarray(casts)
    assert casts.min() >= 85 and casts.max() <= 115  # 100 x [0.85, 1.15]
    # Independent per channel: a cast, not a brightness change.
    assert np.mean(np.ptp(casts, axis=1) >= 3) > 0.5
    assert np.array_equal(np.asarray(RandomChannelGains(p=0.0, max_change=0.15)(grey)), np.asarray(grey))


def test_jpeg_recompression_changes_pixels_and_keeps_size_and_mode():
    random.seed(2)
    img = _image()
    out = RandomJpeg(p=1.0, quality=(30, 30))(img)
    assert out.size == img.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, np.int16) - np.asarray(img, np.int16)).mean() > 5


@pytest.mark.parametrize("resize_mode, red_share", [("crop", 0.0), ("squash", 0.25)])
def test_squash_training_keeps_the_whole_field_like_serving(resize_mode, red_share):
    # A 3:1 strip whose left quarter is red: a centre crop (what "crop" serves) loses the red
    # quarter, a squash (what "squash" serves) keeps it; training must see what serving sees.
    arr = np.zeros((40, 120, 3), dtype=np.uint8)
    arr[..., 2] = 255
    arr[:, :30] = (255, 0, 0)
    pp = Preprocessing(input_size=64, mean=(0.0,) * 3, std=(1.0,) * 3, resize_mode=resize_mode)
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(8):
        x = build_transforms(pp, train=True, scale=(1.0, 1.0))(Image.fromarray(arr))
        red = float(((x[0] > 0.6) & (x[2] < 0.4)).float().mean())
        assert red == pytest.approx(red_share, abs=0.05)
