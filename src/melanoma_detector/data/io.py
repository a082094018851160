"""Image decoding shared by training, evaluation and serving (Pillow + numpy only, no torch)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from melanoma_detector.errors import ImageDecodeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ACCEPTED_FORMATS = "JPEG, PNG, BMP, TIFF or WebP"
# Pillow's plugins for exactly those formats (MPO camera JPEGs open through "JPEG"). Without the
# list, Image.open tries all ~40 of Pillow's readers (EPS, PSD, FITS, ...) on untrusted bytes.
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")

ImageSource = Union[str, Path, bytes]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


# Orientation tag values that need a transpose (1 is "as stored"; anything else is invalid and ignored,
# as Pillow's exif_transpose does).
_TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)


def upright(img: Image.Image, *, in_place: bool = False) -> Image.Image:
    """`img` turned upright per its EXIF orientation tag, the tag then removed.

    Without a tag (or with 1) it is `img` itself, not a copy: ImageOps.exif_transpose copies every
    image, which for a 48-megapixel photo is another ~180 MB. `in_place=True` turns `img` itself
    (releasing the stored pixels once turned); otherwise `img` is left as it was.
    """
    img.load()
    if img.getexif().get(ExifTags.Base.Orientation, 1) not in _TRANSPOSING_ORIENTATIONS:
        return img
    if in_place:
        ImageOps.exif_transpose(img, in_place=True)
        return img
    return ImageOps.exif_transpose(img) or img


def _rescaled_grey(img: Image.Image) -> Image.Image:
    """High-bit-depth greyscale -> 8-bit L (Pillow's convert would clip everything above 255 to white)."""
    if img.mode.startswith("I;16"):
        # 16-bit containers often hold 10-, 12- or 14-bit sensor data: full scale of the smallest of those depths
        # that holds the maximum (65535 -> 255 for true 16-bit, 4095 -> 255 for 12-bit), so an 8-bit picture
        # saved as 16-bit (x257) or as 12-bit (x16) decodes to itself and 12-bit data is not left nearly black.
        arr = np.asarray(img).astype(np.uint32)
        hi = int(arr.max()) if arr.size else 0
        full = next(2**b - 1 for b in (8, 10, 12, 14, 16) if hi < 2**b)
        arr = (arr * 255 + full // 2) // full
        return Image.fromarray(arr.astype(np.uint8))
    # "I" (32-bit integer) and "F" (float) have no known full scale: [0, max] -> [0, 255] (negative
    # values, NaN and infinities become 0).
    arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    arr = np.clip(arr, 0, None)
    hi = float(arr.max()) if arr.size else 0.0
    arr = arr * np.float32(255.0 / hi) if hi > 0 else arr
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (16-bit greyscale at the full scale of its bit depth, 32-bit and float greyscale stretched to
    their maximum, alpha composited on black). An RGB image is returned as it is, not copied."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _rescaled_grey(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _error(name: str, reason: str) -> ImageDecodeError:
    return ImageDecodeError(f"{name}: {reason}", name=name, reason=reason)


def _check_pixels(img: Image.Image, name: str) -> None:
    # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS (and raises above). Checking the size
    # here refuses both, whatever the process's warning filters are: a warnings.catch_warnings()
    # block would not do that, as it swaps process-wide state that other decoding threads share.
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise _error(name, f"image too large ({img.width}x{img.height}, over {limit} pixels); downscale it first")


def load_image(source: ImageSource, *, name: str | None = None) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image, upright per its EXIF orientation.

    Raises ImageDecodeError (one line, naming the file, or `name` when given) for anything that is
    not a readable image; nothing else escapes for a bad file.
    """
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("<bytes>" if is_bytes else str(source))
    try:
        if is_bytes:
            if len(source) == 0:
                raise _error(name, f"empty file; expected a {ACCEPTED_FORMATS} image")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            if path.is_dir():
                raise _error(name, "is a directory, not an image file")
            if not path.exists():
                raise _error(name, "file not found")
            if path.stat().st_size == 0:
                raise _error(name, f"empty file; expected a {ACCEPTED_FORMATS} image")
            fp = path.open("rb")
        with fp, Image.open(fp, formats=PILLOW_FORMATS) as img:
            _check_pixels(img, name)
            img.load()
            # In place, and only with an orientation tag; to_rgb copies only to change the mode: a
            # large photo is then held once, not three times (decode, transpose, convert).
            return to_rgb(upright(img, in_place=True))
    except ImageDecodeError:
        raise
    except PermissionError:
        raise _error(name, "permission denied (the file must be readable)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _error(name, f"image too large (over {Image.MAX_IMAGE_PIXELS} pixels); downscale it first") from None
    except UnidentifiedImageError:
        raise _error(name, f"not a recognised image; expected {ACCEPTED_FORMATS}") from None
    # Pillow's readers signal corrupt data with any of these (Image.open itself maps the last four
    # to UnidentifiedImageError, but load() and the EXIF parser let them through).
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError,
            struct.error, IndexError, TypeError, KeyError, ZeroDivisionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _error(name, f"cannot decode image ({msg})") from None
