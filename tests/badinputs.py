"""A corpus of bad and odd image inputs, generated in a folder in well under a second.

Every entry point (predict CLI, Predictor, REST API and Gradio page, data check, training loader)
is tested against the same corpus, so `docs/inputs.md` can promise one behaviour per input.

Kinds:
  "undecodable"  not a usable image: every entry point refuses it with a one-line reason
  "accepted"     a valid image in an unusual mode: decoded to upright 8-bit RGB like any other
                 (greyscale ones, `colourless`, may then be refused by the model's lesion-likeness
                 gate: dermoscopy is colour, and a colourless copy can fall outside what it saw)
  "gate"         decodes, but the predictor's input gate refuses it (too small): cannot_assess
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass(frozen=True)
class BadInput:
    name: str  # file name inside the corpus folder
    kind: str  # "undecodable" | "accepted" | "gate"
    words: str  # a fragment the reason/message must contain ("" when accepted)
    size: tuple[int, int] | None = None  # (width, height) after decoding, for accepted/gate inputs
    colourless: bool = False  # greyscale: the predictor may answer ok or "does not look like" dermoscopy

    def path(self, root: Path) -> Path:
        return root / self.name


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, *, rows: int | None = None) -> bytes:
    """A greyscale PNG declaring width x height pixels. With rows=None the pixel data is complete
    (all zeros: megabytes of raw pixels compress to kilobytes, a real decompression bomb); with rows=k
    only k rows are stored, so the file is tiny and only its header is a bomb."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + zero pixels
    body = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def example_image(size: int = 160) -> Image.Image:
    """A real dermoscopic sample (so the shipped model's gate accepts it), downscaled; a textured
    synthetic lesion when the examples are missing."""
    files = sorted(EXAMPLES.glob("*.jpg"))
    if files:
        with Image.open(files[0]) as img:
            img = img.convert("RGB")
        img.thumbnail((size, size))
        return img
    rng = np.random.default_rng(0)
    arr = rng.integers(60, 220, (size * 3 // 4, size, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sixteen_bit(img: Image.Image) -> Image.Image:
    """An I;16 greyscale copy at full 16-bit scale (x257, as an 8-bit picture saved as 16-bit is), so
    a decoder that clips 16-bit values to 255 returns an all-white image."""
    grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # 0..65535
    return Image.fromarray(grey.astype("<u2"))  # numpy uint16 -> Pillow mode I;16


def exif_rotated(img: Image.Image) -> bytes:
    """A JPEG whose stored pixels are landscape with EXIF Orientation 6 (display rotated 90 deg CW)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=92, exif=exif.tobytes())


CORPUS: tuple[BadInput, ...] = (
    BadInput("zero-bytes.jpg", "undecodable", "empty file"),
    BadInput("truncated.jpg", "undecodable", "cannot decode image"),
    BadInput("random-bytes.jpg", "undecodable", "not a recognised image"),
    BadInput("svg-named.jpg", "undecodable", "not a recognised image"),
    BadInput("html-named.png", "undecodable", "not a recognised image"),
    BadInput("text-named.jpg", "undecodable", "not a recognised image"),
    BadInput("bomb-header.png", "undecodable", "too large"),
    BadInput("bomb-compressed.png", "undecodable", "too large"),
    BadInput("folder.jpg", "undecodable", "directory"),
    BadInput("no-permission.jpg", "undecodable", "permission denied"),
    BadInput("alpha.png", "accepted", ""),
    BadInput("palette.png", "accepted", ""),
    BadInput("grey.png", "accepted", "", colourless=True),
    BadInput("cmyk.jpg", "accepted", ""),
    BadInput("sixteen-bit.png", "accepted", "", colourless=True),
    BadInput("exif-rotated.jpg", "accepted", ""),
    BadInput("one-pixel.png", "gate", "1x1 pixels", (1, 1)),
    BadInput("elongated.png", "gate", "4000x2 pixels", (4000, 2)),
)
BY_NAME = {c.name: c for c in CORPUS}
LESION_GATE_WORDS = "does not look like a dermoscopic"  # the predictor's out-of-distribution refusal


def refused_only_for_colour(case: BadInput, status: str, reason: str) -> bool:
    """A colourless but valid image that the lesion-likeness gate refused: an accepted outcome."""
    return case.kind == "accepted" and case.colourless and status == "cannot_assess" and LESION_GATE_WORDS in reason


def unreadable_skip_reason(path: Path) -> str | None:
    """Why the chmod-000 case cannot be tested here (root, or a file system ignoring modes), else None."""
    try:
        with path.open("rb"):
            pass
    except PermissionError:
        return None
    return f"{path.name} is still readable after chmod 000 (running as uid {os.geteuid()})"


def make_corpus(root: Path) -> dict[str, Path]:
    """Write every corpus entry into root (created); returns name -> path. The unreadable file is
    only made unreadable; callers skip it when `unreadable_skip_reason` says it is still readable."""
    root.mkdir(parents=True, exist_ok=True)
    base = example_image()
    rng = np.random.default_rng(1)
    jpeg = _encode(base, "JPEG", quality=90)
    files: dict[str, bytes] = {
        "zero-bytes.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "random-bytes.jpg": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "svg-named.jpg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="200" height="200">'
                         b'<circle cx="100" cy="100" r="80" fill="brown"/></svg>',
        "html-named.png": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "text-named.jpg": b"This is a plain text file, not a photo.\n" * 20,
        # Over 2x Image.MAX_IMAGE_PIXELS: Pillow raises DecompressionBombError when opening.
        "bomb-header.png": png_bomb(40_000, 40_000, rows=4),
        # Between 1x and 2x the limit, where Pillow only warns: 100M pixels in about 100 kB.
        "bomb-compressed.png": png_bomb(10_000, 10_000),
        "no-permission.jpg": jpeg,
        "alpha.png": _encode(base.convert("RGBA"), "PNG"),
        "palette.png": _encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "grey.png": _encode(base.convert("L"), "PNG"),
        "cmyk.jpg": _encode(base.convert("CMYK"), "JPEG", quality=92),
        "sixteen-bit.png": _encode(sixteen_bit(base), "PNG"),
        "exif-rotated.jpg": exif_rotated(base),
        "one-pixel.png": _encode(Image.new("RGB", (1, 1), (150, 100, 80)), "PNG"),
        "elongated.png": _encode(Image.fromarray(rng.integers(0, 256, (2, 4000, 3), dtype=np.uint8)), "PNG"),
    }
    out = {}
    for name, data in files.items():
        p = root / name
        p.write_bytes(data)
        out[name] = p
    (root / "folder.jpg").mkdir(exist_ok=True)
    out["folder.jpg"] = root / "folder.jpg"
    os.chmod(out["no-permission.jpg"], 0)
    assert set(out) == set(BY_NAME), set(out) ^ set(BY_NAME)
    return out


def cases(kind: str) -> list[BadInput]:
    return [c for c in CORPUS if c.kind == kind]


def expected_size(name: str) -> tuple[int, int]:
    """Upright (width, height) of an accepted corpus image."""
    w, h = example_image().size
    return (h, w) if name == "exif-rotated.jpg" else (w, h)


def restore_permissions(root: Path) -> None:
    """chmod the unreadable file back so pytest can clean the folder up."""
    p = root / "no-permission.jpg"
    if p.exists():
        os.chmod(p, 0o644)
