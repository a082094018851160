"""The model bundle: `model.onnx` + `metadata.json` (+ `ood.npz`, `MODEL_CARD.md`), the one source
of truth for preprocessing, class names, temperature, thresholds, risk tiers and the input gate.

Reading a bundle never imports torch, and never uses pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_probability(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _is_numbers(value: Any, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(_is_number(v) for v in value)


def _predates_logit_bias(metadata: dict[str, Any]) -> bool:
    """A bundle exported before calibration had a bias (format 1 then too): temperature only, and a
    `calibration` record, if any, that names no bias. Its bias is 0; any later bundle records one."""
    calibration = metadata.get("calibration")
    method = calibration.get("method", "") if isinstance(calibration, dict) else ""
    return "bias" not in str(method)


# What the predictor reads from metadata.json, each with a test of its value and the values accepted.
_REQUIRED: tuple[tuple[str, Any, str], ...] = (
    ("graph.file", lambda v: isinstance(v, str) and bool(v), "the graph's file name in the bundle, e.g. model.onnx"),
    ("class_names", lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(c, str) and c for c in v),
     "a list of 2 class names, e.g. [benign, malignant]"),
    ("preprocessing.input_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
     "a positive whole number of pixels"),
    ("preprocessing.mean", lambda v: _is_numbers(v, 3), "a list of 3 numbers (R, G, B)"),
    ("preprocessing.std", lambda v: _is_numbers(v, 3) and all(x > 0 for x in v), "a list of 3 positive numbers (R, G, B)"),
    ("temperature", lambda v: _is_number(v) and v > 0, "a positive number (1.0: uncalibrated)"),
    ("logit_bias", _is_number, "a number (0.0: no bias)"),
    ("thresholds.screening", _is_probability, "a probability between 0 and 1"),
    ("thresholds.high_specificity", _is_probability, "a probability between 0 and 1"),
    ("risk_tiers", lambda v: isinstance(v, list) and bool(v), "a non-empty list of {level, min_probability, recommendation}"),
)
_MISSING = object()


def _lookup(metadata: dict[str, Any], key: str) -> Any:
    value: Any = metadata
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def risk_of(tiers, probability: float, default: tuple[str | None, str] = (None, "")) -> tuple[str | None, str]:
    """(level, recommendation) of the highest of `tiers` (ascending by min_probability) that `probability`
    reaches; `default` below them all. One rule for the bundle predictor and a checkpoint's."""
    level, text = default
    for tier in tiers:
        if probability >= tier["min_probability"]:
            level, text = tier["level"], tier["recommendation"]
    return level, text


def check_metadata(metadata: Any, meta_path: str | Path) -> None:
    """Raises BundleError (one line, naming the key and what it accepts) unless `metadata` holds every
    value the predictor needs, of a usable type: a bundle must never load with a key silently replaced by
    a default (a p = 0.8 image labelled "Low" without risk tiers, uncalibrated probabilities compared with
    calibrated thresholds) or fail later with a KeyError."""
    fix = "re-export the bundle with `melanoma export`"
    if not isinstance(metadata, dict):
        raise BundleError(f"{meta_path}: not a bundle's metadata (expected a JSON object); {fix}")
    version = metadata.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{meta_path}: 'format_version' is {version!r}; accepted: a whole number; {fix}")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{meta_path}: bundle format {version} is newer than this software")
    for key, ok, accepted in _REQUIRED:
        value = _lookup(metadata, key)
        if value is _MISSING:
            if key == "logit_bias" and _predates_logit_bias(metadata):
                continue  # temperature-only calibration: a bias of 0
            raise BundleError(f"{meta_path}: missing '{key}' (accepted: {accepted}); {fix}")
        if not ok(value):
            raise BundleError(f"{meta_path}: '{key}' is {_short(value)}; accepted: {accepted}; {fix}")
    for name, value in metadata["thresholds"].items():
        if not _is_probability(value):
            raise BundleError(f"{meta_path}: 'thresholds.{name}' is {_short(value)}; accepted: a probability between 0 and 1; {fix}")
    for i, tier in enumerate(metadata.get("risk_tiers", [])):
        if not (isinstance(tier, dict) and isinstance(tier.get("level"), str) and tier["level"]
                and _is_probability(tier.get("min_probability")) and isinstance(tier.get("recommendation"), str)):
            raise BundleError(
                f"{meta_path}: 'risk_tiers[{i}]' is {_short(tier)}; accepted: {{level: text, min_probability: "
                f"a probability between 0 and 1, recommendation: text}}; {fix}"
            )
    try:
        Preprocessing.from_dict(metadata["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{meta_path}: 'preprocessing': {str(exc).splitlines()[0]}; {fix}") from None
    gate = metadata.get("input_gate", {})
    if not isinstance(gate, dict):
        raise BundleError(f"{meta_path}: 'input_gate' is {_short(gate)}; accepted: an object; {fix}")
    for key, ok, accepted in (
        ("min_side", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive whole number"),
        ("min_std", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    ):
        if key in gate and not ok(gate[key]):
            raise BundleError(f"{meta_path}: 'input_gate.{key}' is {_short(gate[key])}; accepted: {accepted}; {fix}")
    ood = gate.get("ood")
    if ood:
        if not isinstance(ood, dict) or not _is_number(ood.get("threshold")) or not (
            isinstance(ood.get("file"), str) or ("mean" in ood and "precision" in ood)
        ):
            raise BundleError(
                f"{meta_path}: 'input_gate.ood' lacks a numeric 'threshold' and a 'file' (or inline 'mean' and "
                f"'precision'); {fix}"
            )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_bundle_path(path: str | Path) -> bool:
    """A bundle folder or its metadata.json, as opposed to a run folder or checkpoint."""
    p = Path(path)
    return (p / "metadata.json").is_file() or p.name == "metadata.json"


def load_bundle(path: str | Path | None = None, *, verify: bool = True) -> Bundle:
    """The bundle at `path` (a folder or its metadata.json; default: default_bundle_dir()), its metadata
    checked (check_metadata) and, with `verify`, its graph's sha256; BundleError, one line, otherwise."""
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
    check_metadata(metadata, meta_path)
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
