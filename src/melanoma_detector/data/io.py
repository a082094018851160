"""Image decoding shared by training, evaluation and serving (Pillow + numpy only, no torch)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from melanoma_detector.errors import ImageDecodeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ACCEPTED_FORMATS = "JPEG, PNG, BMP, TIFF or WebP"

ImageSource = Union[str, Path, bytes]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (16-bit rescaled, alpha composited on black)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: convert("RGB") would clip to 255, so rescale to 8 bits first.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        arr = (arr / hi * 255.0) if hi > 0 else arr
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image, upright per its EXIF orientation.

    Raises ImageDecodeError (one line, naming the file) for anything that is not a readable image.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise ImageDecodeError(f"{name}: empty file; expected a {ACCEPTED_FORMATS} image")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            if path.is_dir():
                raise ImageDecodeError(f"{name}: is a directory, not an image file")
            if not path.exists():
                raise ImageDecodeError(f"{name}: file not found")
            if path.stat().st_size == 0:
                raise ImageDecodeError(f"{name}: empty file; expected a {ACCEPTED_FORMATS} image")
            fp = path.open("rb")
        with fp, warnings.catch_warnings():
            # Pillow warns (not raises) between 1x and 2x its pixel limit; treat as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return to_rgb(img)
    except ImageDecodeError:
        raise
    except PermissionError:
        raise ImageDecodeError(f"{name}: permission denied (the file must be readable)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(
            f"{name}: image too large (over {Image.MAX_IMAGE_PIXELS} pixels); downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not a recognised image; expected {ACCEPTED_FORMATS}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageDecodeError(f"{name}: cannot decode image ({msg})") from None
