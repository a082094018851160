"""Perceptual fingerprints of the images a model trained and was calibrated on, shipped in its bundle.

`melanoma evaluate` counts the scored images a model has seen by path, by image key or by file name and bytes
(`evaluation.evaluate.training_overlap`). A copy that was renamed, resized, squashed to a square, re-encoded,
mirrored or brightened escapes all three, and collections assembled from the ISIC archive can hold such copies of
HAM10000 and ISIC 2017 images: scored as "unseen", they make an evaluation optimistic without a word. The bundle
therefore stores, for every image its members trained on and its export calibrated on, the 256-bit DCT pHash
(`data.check.phash_variants`, hash_size 16: the signs of a 64x64 greyscale thumbnail's 16x16 low-frequency DCT
block) of the image and, for an image that is not square, of its centred square crop. Evaluation hashes each scored
image, and its centred square crop, in its 8 orientations, and counts it a copy of a seen image when one hash is
within COPY_BITS of a stored one.

Why 256 bits and COPY_BITS = 24 (the `data check` NEAR_SURE_BITS): the 64-bit pHash cannot tell apart two
centred brown lesions on skin, and at 256 bits the copies `data check` measured lie under 24 bits while different
lesions of the same look start at about 32. `benchmarks/lookalike_copies.py` measures it on the shipped split: how
many resized, squashed, re-encoded, mirrored, brightened or cropped copies of training images are found, and how
many of the test images, none of which the model saw, are wrongly matched. A crop of more than a few per cent
per side (other than the centred square) is not found: the thumbnail's content moves.

Plain numpy + Pillow + scipy's DCT; the file is a numpy .npz without pickled objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from melanoma_detector.errors import DataError

FILE_NAME = "seen_images.npz"
COPY_BITS = 24
HASH_SIZE = 16  # 256 bits: four uint64 words per hash
ROLES = ("train", "val")
METHOD = (f"256-bit DCT pHash of each image and of its centred square crop; a scored image in any of its 8 "
          f"orientations within {COPY_BITS} bits of one is a copy")


def _words(h: int) -> np.ndarray:
    return np.array([(h >> (64 * k)) & 0xFFFF_FFFF_FFFF_FFFF for k in range(4)], dtype=np.uint64)


def _square(img: Image.Image) -> Image.Image | None:
    w, h = img.size
    if w == h:
        return None
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def _views(img: Image.Image) -> list[Image.Image]:
    square = _square(img)
    return [img] if square is None else [img, square]


def seen_hashes(img: Image.Image) -> np.ndarray:
    """The (k, 4) uint64 hashes stored for one seen image: as it is and, when not square, its centred square."""
    from melanoma_detector.data.check import phash_variants

    return np.stack([_words(phash_variants(v, hash_size=HASH_SIZE)[0]) for v in _views(img)])


def query_hashes(img: Image.Image) -> np.ndarray:
    """The (8k, 4) uint64 hashes a scored image is looked up by: each view in its 8 flips and rotations."""
    from melanoma_detector.data.check import phash_variants

    return np.stack([_words(h) for v in _views(img) for h in phash_variants(v, hash_size=HASH_SIZE)])


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


@dataclass(frozen=True)
class SeenImages:
    """Fingerprints of a model's seen images: `hashes` (n, 4) uint64, `role` (n,) index into ROLES, and how many
    distinct images of each role were hashed (`counts`) or listed but not found (`missing`)."""

    hashes: np.ndarray
    role: np.ndarray
    counts: dict[str, int]
    missing: dict[str, int]

    def distances(self, img: Image.Image) -> dict[str, int]:
        """Per role, the fewest differing bits between any of the image's views and orientations and a stored hash."""
        q = query_hashes(img)
        out: dict[str, int] = {}
        for i, role in enumerate(ROLES):
            stored = self.hashes[self.role == i]
            if len(stored):
                out[role] = int(_popcount(stored[None, :, :] ^ q[:, None, :]).sum(axis=2).min())
        return out

    def copies_of(self, img: Image.Image) -> list[str]:
        """The roles (train, val) holding an image this one is a copy of."""
        return [role for role, d in self.distances(img).items() if d <= COPY_BITS]

    def save(self, path: str | Path) -> str:
        """Write the .npz (atomically) and return its sha256."""
        from melanoma_detector.fileio import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.savez_compressed(fh, hashes=self.hashes, role=self.role.astype(np.uint8),
                                roles=np.array(ROLES), counts=np.array([self.counts.get(r, 0) for r in ROLES]),
                                missing=np.array([self.missing.get(r, 0) for r in ROLES]))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: str | Path, *, sha256: str | None = None) -> SeenImages:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read the seen-image fingerprints ({e.strerror or e})") from None
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise DataError(f"{path}: sha256 differs from the one the bundle's metadata records; accepted: the "
                            f"{FILE_NAME} export wrote")
        import io

        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                hashes, role = z["hashes"], z["role"]
                roles = [str(r) for r in z["roles"]]
                counts, missing = z["counts"], z["missing"]
        except (ValueError, KeyError, OSError) as e:
            raise DataError(f"{path}: not a fingerprint file of `melanoma export` ({e})") from None
        if roles != list(ROLES) or hashes.ndim != 2 or hashes.shape[1] != 4 or hashes.dtype != np.uint64 \
                or role.shape != (len(hashes),):
            raise DataError(f"{path}: not a fingerprint file of `melanoma export` (unexpected arrays)")
        return cls(hashes, role.astype(np.int64), dict(zip(ROLES, map(int, counts))),
                   dict(zip(ROLES, map(int, missing))))


def fingerprint_images(paths_by_role: dict[str, Sequence[str]], *, workers: int = 2,
                       progress: bool = False) -> SeenImages:
    """Hash every image listed per role (train, val). A listed image that is missing or unreadable is counted in
    `missing`, not fatal: the fingerprints are a safeguard for evaluation, not what the model is."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from melanoma_detector.data.io import load_image
    from melanoma_detector.errors import ImageDecodeError

    def one(path: str) -> np.ndarray | None:
        try:
            return seen_hashes(load_image(path))
        except (ImageDecodeError, OSError):
            return None

    hashes: list[np.ndarray] = []
    role: list[int] = []
    counts, missing = {}, {}
    for i, name in enumerate(ROLES):
        paths = list(dict.fromkeys(paths_by_role.get(name) or ()))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            got = list(tqdm(pool.map(one, paths), total=len(paths), desc=f"fingerprinting {name} images",
                            unit="img", disable=not progress))
        found = [h for h in got if h is not None]
        counts[name], missing[name] = len(found), len(paths) - len(found)
        for h in found:
            hashes.append(h)
            role += [i] * len(h)
    stacked = np.concatenate(hashes) if hashes else np.empty((0, 4), dtype=np.uint64)
    return SeenImages(stacked, np.array(role, dtype=np.int64), counts, missing)


def count_copies(seen: SeenImages, paths: Iterable[str]) -> dict[str, int]:
    """Per role, how many of `paths` are copies of a seen image (an unreadable one counts as none)."""
    from melanoma_detector.data.io import load_image
    from melanoma_detector.errors import ImageDecodeError

    out = dict.fromkeys(ROLES, 0)
    for p in paths:
        try:
            img = load_image(p)
        except (ImageDecodeError, OSError):
            continue
        for role in seen.copies_of(img):
            out[role] += 1
    return out
