"""Training augmentation and the deterministic evaluation transform (torch tensors out).

The evaluation transform is `preprocess.preprocess_image`, the same code the torch-free
predictor runs, so training-time validation and serving see identical inputs.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageFilter

from melanoma_detector.config import AUGMENTATIONS
from melanoma_detector.data.shifts import channel_gains, jpeg_roundtrip
from melanoma_detector.preprocess import INTERPOLATIONS, Preprocessing, normalize, preprocess_image


class RandomRot90:
    """Dermoscopy has no canonical orientation: rotate by a random multiple of 90 degrees."""

    def __call__(self, img: Image.Image) -> Image.Image:
        k = random.randint(0, 3)
        ops = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
        return img if k == 0 else img.transpose(ops[k])


class RandomBlur:
    """Pillow's Gaussian blur with probability p: torchvision's would round-trip through a tensor."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(random.uniform(*self.sigma)))


class RandomChannelGains:
    """White balance differs between dermatoscopes: with probability p, multiply R, G and B by
    independent factors in [1 - max_change, 1 + max_change]. ColorJitter's hue shift rotates all
    hues alike and its brightness scales the channels together, so neither makes this cast."""

    def __init__(self, p: float, max_change: float):
        self.p, self.max_change = p, max_change

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return channel_gains(img, [random.uniform(1 - self.max_change, 1 + self.max_change) for _ in range(3)])


class RandomJpeg:
    """With probability p, re-encode as JPEG at a random quality: images from other sources arrive
    compressed to varying degrees, with block artefacts the training images may not have."""

    def __init__(self, p: float, quality: tuple[int, int]):
        self.p, self.quality = p, quality

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return jpeg_roundtrip(img, random.randint(*self.quality))


class _Finish:
    def __init__(self, pp: Preprocessing):
        self.pp = pp

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(normalize(img, self.pp))


class EvalTransform:
    def __init__(self, pp: Preprocessing):
        self.pp = pp

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(img, self.pp))


def build_transforms(pp: Preprocessing, *, train: bool, augmentation: str = "standard",
                     scale: tuple[float, float] = (0.5, 1.0)):
    """Augmentation used in dermoscopy work: random resized crop, flips, 90-degree rotations and
    mild colour jitter (dermatoscopes differ in white balance and exposure).

    "strong" adds what ISIC challenge entries use against overfitting and for other cameras:
    wider colour jitter, an occasional slight blur (lower-resolution devices) and one random
    erased patch, so that no single region (a ruler, a hair, a vignette corner) decides.

    "acquisition" adds, to the standard set, what changes when the same lesion is photographed
    with another device: white balance (per-channel gains up to 15 %), slight blur and JPEG
    re-compression (quality 30-90)."""
    if not train:
        return EvalTransform(pp)
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation {augmentation!r}; accepted: {', '.join(AUGMENTATIONS)}")
    from torchvision import transforms as T

    strong, acquisition = augmentation == "strong", augmentation == "acquisition"
    steps = []
    if pp.resize_mode == "squash":
        # Served images are squashed to a square (HAM10000's 4:3 as ISIC 2017's originals were):
        # crop from the squashed image, so the served geometry is the centre of what training saw,
        # not one end of RandomResizedCrop's aspect-ratio range.
        scaled = int(round(pp.input_size / pp.crop_pct))
        steps.append(T.Resize((scaled, scaled), interpolation=T.InterpolationMode(pp.interpolation)))
    steps += [
        T.RandomResizedCrop(
            pp.input_size,
            scale=scale,
            ratio=(3 / 4, 4 / 3),
            interpolation=T.InterpolationMode(pp.interpolation),
        ),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
        RandomRot90(),
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.05) if strong
        else T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.03),
    ]
    if strong:
        steps.append(RandomBlur(p=0.2, sigma=(0.1, 1.2)))
    if acquisition:
        steps += [RandomChannelGains(p=0.8, max_change=0.15), RandomBlur(p=0.2, sigma=(0.1, 1.2)),
                  RandomJpeg(p=0.3, quality=(30, 90))]
    steps.append(_Finish(pp))
    if strong:
        # On the normalised tensor, so the erased patch is the mean colour (value 0), not black.
        steps.append(T.RandomErasing(p=0.5, scale=(0.02, 0.12), ratio=(0.5, 2.0), value=0))
    return T.Compose(steps)


__all__ = ["AUGMENTATIONS", "INTERPOLATIONS", "EvalTransform", "RandomBlur", "RandomChannelGains", "RandomJpeg",
           "RandomRot90", "build_transforms", "np"]
