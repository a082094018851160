"""Training augmentation and the deterministic evaluation transform (torch tensors out).

The evaluation transform is `preprocess.preprocess_image`, the same code the torch-free
predictor runs, so training-time validation and serving see identical inputs.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from melanoma_detector.preprocess import INTERPOLATIONS, Preprocessing, normalize, preprocess_image


class RandomRot90:
    """Dermoscopy has no canonical orientation: rotate by a random multiple of 90 degrees."""

    def __call__(self, img: Image.Image) -> Image.Image:
        k = random.randint(0, 3)
        ops = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
        return img if k == 0 else img.transpose(ops[k])


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


def build_transforms(pp: Preprocessing, *, train: bool, scale: tuple[float, float] = (0.5, 1.0)):
    """Augmentation used in dermoscopy work: random resized crop, flips, 90-degree rotations and
    mild colour jitter (dermatoscopes differ in white balance and exposure)."""
    if not train:
        return EvalTransform(pp)
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(
                pp.input_size,
                scale=scale,
                ratio=(3 / 4, 4 / 3),
                interpolation=T.InterpolationMode(pp.interpolation),
            ),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            RandomRot90(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.03),
            _Finish(pp),
        ]
    )


__all__ = ["build_transforms", "EvalTransform", "RandomRot90", "INTERPOLATIONS", "np"]
