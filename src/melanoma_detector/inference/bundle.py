"""The model bundle: `model.onnx` + `metadata.json` (+ `ood.npz`, `MODEL_CARD.md`), the one source
of truth for preprocessing, class names, temperature, thresholds, risk tiers and the input gate.

Reading a bundle never imports torch, and never uses pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_detector.errors import UserError
from melanoma_detector.preprocess import Preprocessing

BUNDLE_FORMAT_VERSION = 1
OOD_FILE = "ood.npz"
_REPO_BUNDLE = Path(__file__).resolve().parents[3] / "models" / "default"


class BundleError(UserError):
    pass


def default_bundle_dir() -> Path:
    """$MELANOMA_MODEL, else the bundle shipped in the repository (models/default) beside this source
    tree, else models/default under the working folder: a wheel installed from a clone (`pip install
    '.[serve]'`) does not carry the bundle, but is run from the clone."""
    env = os.environ.get("MELANOMA_MODEL")
    if env:
        return Path(env)
    in_cwd = Path.cwd() / "models" / "default"
    if not (_REPO_BUNDLE / "metadata.json").is_file() and (in_cwd / "metadata.json").is_file():
        return in_cwd
    return _REPO_BUNDLE


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    metadata: dict[str, Any]

    @property
    def graph_path(self) -> Path:
        return self.root / self.metadata["graph"]["file"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    @property
    def temperature(self) -> float:
        return float(self.metadata.get("temperature", 1.0))

    @property
    def logit_bias(self) -> float:
        return float(self.metadata.get("logit_bias", 0.0))

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.metadata["thresholds"].items()}

    def ood(self, *, verify: bool = True) -> dict[str, Any] | None:
        """The input gate's out-of-distribution statistics, arrays included, or None.

        Bundles written before `ood.npz` existed keep the arrays inline in metadata.json.
        """
        info = self.metadata.get("input_gate", {}).get("ood")
        if not info:
            return None
        if "file" not in info:
            return info
        path = self.root / info["file"]
        if not path.is_file():
            raise BundleError(f"{path}: input-gate statistics missing from the bundle")
        data = path.read_bytes()  # read once: the bytes hashed are the bytes loaded
        if verify and hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise BundleError(f"{path}: sha256 does not match metadata.json; refusing a changed or corrupted file")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {"mean": npz["mean"], "precision": npz["precision"]}
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"{path}: unreadable input-gate statistics ({exc})") from None
        return {**info, **arrays}

    @property
    def version(self) -> str:
        return str(self.metadata.get("model_version", "unknown"))


def is_bundle_path(path: str | Path) -> bool:
    """A bundle folder or its metadata.json, as opposed to a run folder or checkpoint."""
    p = Path(path)
    return (p / "metadata.json").is_file() or p.name == "metadata.json"


def load_bundle(path: str | Path | None = None, *, verify: bool = True) -> Bundle:
    root = Path(path) if path is not None else default_bundle_dir()
    if root.is_file() and root.name == "metadata.json":
        root = root.parent
    meta_path = root / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(
            f"no model bundle at {root} (expected a folder with metadata.json and model.onnx, "
            "as written by `melanoma export`)"
        )
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: unreadable metadata ({exc})") from None
    for key in ("graph", "preprocessing", "thresholds", "class_names"):
        if key not in metadata:
            raise BundleError(f"{meta_path}: missing '{key}'; re-export the bundle with `melanoma export`")
    if int(metadata.get("format_version", 0)) > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{meta_path}: bundle format {metadata['format_version']} is newer than this software")
    bundle = Bundle(root, metadata)
    if not bundle.graph_path.is_file():
        raise BundleError(f"{bundle.graph_path}: model graph missing from the bundle")
    if verify:
        expected = metadata["graph"].get("sha256")
        actual = sha256_file(bundle.graph_path)
        if expected != actual:
            raise BundleError(
                f"{bundle.graph_path}: sha256 {actual[:12]}... does not match metadata.json "
                f"({str(expected)[:12]}...); the graph was changed or corrupted, refusing to load it"
            )
    return bundle
