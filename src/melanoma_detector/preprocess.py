"""Evaluation-time preprocessing, in Pillow + numpy only.

Training's deterministic transform, evaluation and the torch-free predictor all call
`preprocess_image`, so the model sees bit-identical inputs wherever it runs. Its parameters live
in the checkpoint and the model bundle, never in the code that consumes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZE_MODES = ("crop", "squash")
# "crop" keeps only the centre of the long side. A strip longer than this many times its width
# (never a photo) is cut to that first: resizing a 1x60000 strip whole would make a 224x13M-pixel
# intermediate image (9 GB, half a minute) just to keep 224x224 of it.
MAX_ASPECT = 8
COLOR_CONSTANCY = ("none", "shades_of_gray")
# Minkowski norm of Shades of Grey. p = 6 is the value Barata et al. (2015) found best for
# dermoscopy and that ISIC 2018-2019 entries used; p = 1 would be grey world, p -> inf max-RGB.
SHADES_OF_GRAY_POWER = 6.0


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    # "crop": shorter side to size/crop_pct, centre crop (keeps aspect ratio, may cut the edges);
    # "squash": both sides to size/crop_pct (keeps everything, distorts aspect ratio).
    resize_mode: str = "crop"
    # "shades_of_gray": divide out the illuminant estimated on the (cropped) image itself, so
    # that dermatoscopes with another white balance look alike; "none": pixels as decoded.
    color_constancy: str = "none"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}; accepted: {', '.join(INTERPOLATIONS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r}; accepted: {', '.join(RESIZE_MODES)}")
        if self.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(f"color_constancy {self.color_constancy!r}; accepted: {', '.join(COLOR_CONSTANCY)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=str(d.get("interpolation", "bicubic")),
            crop_pct=float(d.get("crop_pct", 1.0)),
            resize_mode=str(d.get("resize_mode", "crop")),
            # Bundles and checkpoints from before colour constancy existed used none.
            color_constancy=str(d.get("color_constancy", "none")),
        )


def _geometry(w: int, h: int, pp: Preprocessing) -> tuple[tuple[int, int, int, int] | None, tuple[int, int], tuple[int, int]]:
    """Where `resize_and_crop` cuts: the strip pre-crop (or None), the resized size, the final crop's corner."""
    size = pp.input_size
    scaled = int(round(size / pp.crop_pct))
    pre = None
    if pp.resize_mode == "crop" and max(w, h) > MAX_ASPECT * min(w, h):
        keep = MAX_ASPECT * min(w, h)
        pre = ((w - keep) // 2, 0, (w - keep) // 2 + keep, h) if w > h else (0, (h - keep) // 2, w, (h - keep) // 2 + keep)
        w, h = pre[2] - pre[0], pre[3] - pre[1]
    if pp.resize_mode == "squash":
        new_w = new_h = scaled
    elif w <= h:
        new_w, new_h = scaled, max(scaled, int(round(h * scaled / w)))
    else:
        new_w, new_h = max(scaled, int(round(w * scaled / h))), scaled
    return pre, (new_w, new_h), ((new_w - size) // 2, (new_h - size) // 2)


def resize_and_crop(img: Image.Image, pp: Preprocessing) -> Image.Image:
    size = pp.input_size
    pre, (new_w, new_h), (left, top) = _geometry(*img.size, pp)
    if pre is not None:
        img = img.crop(pre)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), INTERPOLATIONS[pp.interpolation])
    if (left, top, size, size) != (0, 0, new_w, new_h):
        img = img.crop((left, top, left + size, top + size))
    return img


def crop_box(image_size: tuple[int, int], pp: Preprocessing) -> tuple[float, float, float, float]:
    """The part of an image of `image_size` (w, h) that the model sees, as fractions (left, top, right, bottom)
    of its width and height: what a heatmap of the model's input must be drawn over."""
    w, h = image_size
    pre, (new_w, new_h), (left, top) = _geometry(w, h, pp)
    x0, y0, x1, y1 = pre if pre is not None else (0, 0, w, h)
    sx, sy = (x1 - x0) / new_w, (y1 - y0) / new_h
    size = pp.input_size
    return ((x0 + left * sx) / w, (y0 + top * sy) / h, (x0 + (left + size) * sx) / w, (y0 + (top + size) * sy) / h)


def shades_of_gray(arr: np.ndarray, power: float = SHADES_OF_GRAY_POWER) -> np.ndarray:
    """Colour constancy on a float HWC image in [0, 1] (Finlayson & Trezzi, 2004): the illuminant
    is each channel's Minkowski p-mean, and each channel is scaled so that the illuminant becomes
    neutral grey of the same norm. Clipped to [0, 1]; a channel that is black throughout is left
    alone rather than divided by zero."""
    illuminant = np.power(np.mean(np.power(arr, power, dtype=np.float64), axis=(0, 1)), 1.0 / power)
    norm = np.sqrt(np.sum(illuminant * illuminant))
    if norm <= 0:
        return arr
    # Grey of the same Euclidean norm has each channel at norm / sqrt(3).
    gain = np.where(illuminant > 1e-12, (norm / np.sqrt(3.0)) / np.maximum(illuminant, 1e-12), 1.0)
    return np.clip(arr * gain.astype(np.float32), 0.0, 1.0)


def normalize(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """RGB PIL image -> float32 CHW array, scaled to [0, 1], colour-corrected when the
    preprocessing asks for it, then standardised."""
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    if pp.color_constancy == "shades_of_gray":
        arr = shades_of_gray(arr)
    arr = (arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_image(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    return normalize(resize_and_crop(img, pp), pp)
