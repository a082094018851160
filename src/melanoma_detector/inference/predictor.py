"""`Predictor`: the serving path on ONNX Runtime + numpy + Pillow. Never imports torch.

Per image it returns a calibrated probability, a label at the screening threshold, a risk
level and recommendation from the bundle's tiers, and `status` ok / cannot_assess with a reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from melanoma_detector import DISCLAIMER
from melanoma_detector.calibration import calibrated_probabilities
from melanoma_detector.data.io import ImageSource, load_image, to_rgb, upright
from melanoma_detector.errors import ImageDecodeError
from melanoma_detector.inference.bundle import Bundle, load_bundle, risk_of
from melanoma_detector.preprocess import Preprocessing, crop_box, preprocess_image

RESULT_COLUMNS = [
    "path", "probability_malignant", "predicted_label", "risk_level", "recommendation", "status", "reason",
]


class CannotAssess(Exception):
    """The input gate refused an image; the message is the reason shown to the user."""


def dihedral_views(x: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/90-degree rotations of a CHW array (dermoscopy has no canonical orientation)."""
    views = []
    for k in range(4):
        r = np.rot90(x, k, axes=(1, 2))
        views.extend([r, r[:, :, ::-1]])
    return [np.ascontiguousarray(v) for v in views]


def mahalanobis(features: np.ndarray, ood: dict[str, Any]) -> np.ndarray:
    """Mahalanobis distance of each row of `features` under an input gate's mean and precision matrix."""
    z = features.astype(np.float64) - np.asarray(ood["mean"], np.float64)
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, np.asarray(ood["precision"], np.float64), z), 0))


def gate_image(img: Image.Image, *, min_side: int, min_std: float) -> None:
    """The input gate's cheap checks, before the model: raises CannotAssess with the reason."""
    w, h = img.size
    if min(w, h) < min_side:
        raise CannotAssess(
            f"image is {w}x{h} pixels; at least {min_side} px on each side is needed "
            "(upload the original dermoscopic photo, not a thumbnail)"
        )
    small = np.asarray(img.convert("L").resize((64, 64)), dtype=np.float32)
    if small.std() < min_std:
        raise CannotAssess(
            "image is nearly uniform (no visible lesion); upload a focused dermoscopic photo of the lesion"
        )


@dataclass(frozen=True)
class ImagePrep:
    """Everything before the model (decode, size/uniformity gate, preprocessing) as a small picklable
    value, so worker processes can run it without the ONNX session or the bundle."""

    pp: Preprocessing
    min_side: int = 64
    min_std: float = 4.0

    def prepare(self, source: ImageSource | Image.Image) -> tuple[Image.Image, np.ndarray]:
        # An image the caller opened keeps its EXIF orientation unapplied; upright it as load_image does a file
        # (a copy only when it has an orientation tag or is not RGB: the caller's image is left as it is).
        img = to_rgb(upright(source)) if isinstance(source, Image.Image) else load_image(source)
        gate_image(img, min_side=self.min_side, min_std=self.min_std)
        return img, preprocess_image(img, self.pp)

    def load(self, path: str) -> tuple[np.ndarray | None, str | None]:
        """(array, None), or (None, reason) for an image that cannot be assessed; never raises for a bad file."""
        try:
            return self.prepare(path)[1], None
        except (ImageDecodeError, CannotAssess) as exc:
            return None, str(exc)


class Predictor:
    def __init__(self, bundle: str | Path | Bundle | None = None, *, threads: int | None = 2, verify: bool = True):
        import onnxruntime as ort

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        meta = self.bundle.metadata
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's CPU arena keeps the largest batch's activations reserved for the life of the
        # process; without it the served ensemble peaks at ~320 MB instead of 416 MB, with the same batch-1
        # latency and ~10% less batch-16 throughput (benchmarks/inference_speed.py).
        opts.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(self.bundle.graph_path), opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.pp = self.bundle.preprocessing
        self.temperature = self.bundle.temperature
        self.logit_bias = self.bundle.logit_bias
        self.thresholds = self.bundle.thresholds
        self.threshold = self.thresholds["screening"]
        self.tiers = sorted(meta["risk_tiers"], key=lambda t: t["min_probability"])
        gate = meta.get("input_gate", {})
        self.min_side = int(gate.get("min_side", 64))
        self.min_std = float(gate.get("min_std", 4.0))
        self.ood = None
        ood = self.bundle.ood(verify=verify)
        if ood:
            self.set_ood(ood)

    def set_ood(self, ood: dict[str, Any]) -> None:
        self.ood = {
            "feature": ood.get("feature", "gate_features"),
            "mean": np.asarray(ood["mean"], np.float64),
            "precision": np.asarray(ood["precision"], np.float64),
            "threshold": float(ood["threshold"]),
        }

    # ---- pieces ---------------------------------------------------------------------------
    def check_image(self, img: Image.Image) -> None:
        gate_image(img, min_side=self.min_side, min_std=self.min_std)

    def image_prep(self) -> ImagePrep:
        """The decode + gate + preprocess step on its own: picklable, no ONNX session, for worker processes."""
        return ImagePrep(self.pp, self.min_side, self.min_std)

    def ood_distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of gate features to the validation distribution in the bundle."""
        return mahalanobis(features, self.ood)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {"image": batch.astype(np.float32, copy=False)})
        return dict(zip(self.output_names, outs))

    def risk(self, probability: float) -> tuple[str, str]:
        return risk_of(self.tiers, probability, ("Low", ""))

    def _result(self, path: str, prob: float | None, reason: str = "", extra: dict | None = None) -> dict[str, Any]:
        if prob is None:
            return {
                "path": path, "probability_malignant": None, "predicted_label": None, "risk_level": None,
                "recommendation": "Cannot assess this image: " + reason, "status": "cannot_assess",
                "reason": reason, **(extra or {}),
            }
        level, text = self.risk(prob)
        return {
            "path": path, "probability_malignant": prob,
            "predicted_label": "malignant" if prob >= self.threshold else "benign",
            "risk_level": level, "recommendation": text, "status": "ok", "reason": "", **(extra or {}),
        }

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """The bundle's calibration: sigmoid(logit / T + b), fitted on validation."""
        return calibrated_probabilities(logits, self.temperature, self.logit_bias)

    # ---- public API ------------------------------------------------------------------------
    def prepare(self, source: ImageSource | Image.Image) -> tuple[Image.Image, np.ndarray]:
        """Decode, gate and preprocess; raises ImageDecodeError / CannotAssess."""
        return self.image_prep().prepare(source)

    def _score(self, arrays: list[np.ndarray], *, tta: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if not tta:
            out = self.run(np.stack(arrays))
            return self.calibrate(out["logit"]), out
        probs, firsts = [], []
        for arr in arrays:
            out = self.run(np.stack(dihedral_views(arr)))
            probs.append(self.calibrate(out["logit"]).mean())
            firsts.append({k: v[:1] for k, v in out.items()})  # the identity view, for gate and heatmap
        return np.asarray(probs), {k: np.concatenate([f[k] for f in firsts]) for k in firsts[0]}

    def predict(self, source: ImageSource | Image.Image, *, tta: bool = False, heatmap: bool = False,
                name: str | None = None) -> dict[str, Any]:
        """One image (path, bytes or PIL image) -> result dict; never raises for a bad image."""
        path = name or (str(source) if isinstance(source, (str, Path)) else "<upload>")
        try:
            img, arr = self.prepare(source)
        except ImageDecodeError as exc:
            # Named as the caller knows it: "<bytes>" or a server's temporary upload path would mean
            # nothing to the user (and the path reveals the server's folders).
            return self._result(path, None, f"{path}: {exc.reason}")
        except CannotAssess as exc:
            return self._result(path, None, str(exc))
        probs, out = self._score([arr], tta=tta)
        reason = self._ood_reason(out[self.ood["feature"]][:1])[0] if self.ood is not None else None
        if reason:
            return self._result(path, None, reason)
        extra = {}
        if heatmap:
            extra["heatmap"] = gradcam(out["fmap"][0], out["cam_weights"][0])
            extra["image"] = img
            extra["heatmap_box"] = crop_box(img.size, self.pp)
        return self._result(path, float(probs[0]), extra=extra)

    def _ood_reason(self, features: np.ndarray) -> list[str | None]:
        d = self.ood_distance(features)
        return [
            None if di <= self.ood["threshold"] else
            f"image does not look like a dermoscopic lesion photo (feature distance {di:.1f} > "
            f"{self.ood['threshold']:.1f}); this model only judges dermoscopy images"
            for di in d
        ]

    def predict_prepared(self, paths: Sequence[str], arrays: Sequence[np.ndarray | None],
                         reasons: Sequence[str | None] | None = None, *, tta: bool = False) -> list[dict[str, Any]]:
        """Result dicts for images already decoded, gated and preprocessed (by `prepare` or `ImagePrep`),
        scored as one batch. `arrays[i]` None means the image was refused before the model, for `reasons[i]`."""
        reasons = list(reasons) if reasons is not None else [None] * len(paths)
        ok = [i for i, a in enumerate(arrays) if a is not None]
        probs, ood = {}, {}
        if ok:
            pr, out = self._score([arrays[i] for i in ok], tta=tta)
            rs = self._ood_reason(out[self.ood["feature"]]) if self.ood is not None else [None] * len(ok)
            for j, i in enumerate(ok):
                probs[i], ood[i] = float(pr[j]), rs[j]
        results = []
        for i, p in enumerate(paths):
            if i in probs and not ood[i]:
                results.append(self._result(str(p), probs[i]))
            else:
                results.append(self._result(str(p), None, ood.get(i) or reasons[i] or "image could not be read"))
        return results

    def predict_paths(self, paths: Sequence[str], *, batch_size: int = 16, tta: bool = False,
                      progress: bool = False, workers: int = 2) -> list[dict[str, Any]]:
        """Score a list held in memory; `inference.batch.predict_to_file` streams large jobs to a file."""
        from tqdm import tqdm

        prep = self.image_prep()
        results: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(paths), disable=not progress, desc="predict") as bar:
            for start in range(0, len(paths), batch_size):
                chunk = [str(p) for p in paths[start : start + batch_size]]
                loaded = list(pool.map(prep.load, chunk))
                results.extend(self.predict_prepared(chunk, [a for a, _ in loaded], [r for _, r in loaded], tta=tta))
                bar.update(len(chunk))
        return results

    @property
    def disclaimer(self) -> str:
        return self.bundle.metadata.get("disclaimer", DISCLAIMER)


def run_graph(predictor: Predictor, paths: Sequence[str], *, outputs: Sequence[str] = ("logit",), batch_size: int = 32,
              progress: bool = True, desc: str = "bundle pass") -> dict[str, np.ndarray]:
    """Raw graph outputs (float64; "logit" uncalibrated) for images that must all be scored, as
    export and distillation need: no input gate, and a bad file raises instead of being skipped."""
    from tqdm import tqdm

    got: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, disable=not progress, leave=False):
        out = predictor.run(np.stack([preprocess_image(load_image(p), predictor.pp)
                                      for p in paths[start:start + batch_size]]))
        for name in outputs:
            got[name].append(out[name])
    return {name: np.concatenate(parts).astype(np.float64) for name, parts in got.items()}


def gradcam(fmap: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Grad-CAM: ReLU of the gradient-weighted sum of feature-map channels, scaled to [0, 1]."""
    cam = np.maximum(np.tensordot(weights, fmap, axes=(0, 0)), 0)
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).astype(np.float32)


def overlay_heatmap(img: Image.Image, cam: np.ndarray, *, opacity: float = 0.45,
                    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> Image.Image:
    """Blend a jet-coloured heatmap over the part of `img` the model saw.

    ``box``: that part as fractions (left, top, right, bottom) of the image, from
    :func:`melanoma_detector.preprocess.crop_box` (a prediction's ``heatmap_box``). The model's input is a
    centre crop, so stretching the map over the whole image would put the heat in the wrong place; what lies
    outside the crop is dimmed instead, since the model never saw it."""
    img = img.convert("RGB")
    w, h = img.size
    x0, y0 = int(round(box[0] * w)), int(round(box[1] * h))
    x1, y1 = max(x0 + 1, int(round(box[2] * w))), max(y0 + 1, int(round(box[3] * h)))
    heat = Image.fromarray((cam * 255).astype(np.uint8)).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    v = np.zeros((h, w), np.float32)
    v[y0:y1, x0:x1] = np.asarray(heat, np.float32) / 255.0
    inside = np.zeros((h, w, 1), np.float32)
    inside[y0:y1, x0:x1] = 1.0
    rgb = np.stack([
        np.clip(1.5 - np.abs(4 * v - 3), 0, 1),
        np.clip(1.5 - np.abs(4 * v - 2), 0, 1),
        np.clip(1.5 - np.abs(4 * v - 1), 0, 1),
    ], axis=-1)
    base = np.asarray(img, np.float32) / 255.0
    alpha = opacity * (0.25 + 0.75 * v[..., None]) * inside  # weak attention stays mostly transparent
    out = (base * (1 - alpha) + rgb * alpha) * (0.4 + 0.6 * inside)
    return Image.fromarray((out * 255).clip(0, 255).astype(np.uint8))


def iter_image_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    from melanoma_detector.data.io import is_image_file

    files: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f)))
        else:
            files.append(str(p))
    return files
