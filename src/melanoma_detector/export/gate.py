"""The input gate's out-of-distribution statistics: fitted when a bundle is exported, read by the Predictor.

The gate refuses images whose gate features (per-channel mean and std of the frozen ImageNet part's output,
graph output `gate_features`) are far, in Mahalanobis distance, from those of validation dermoscopy. Fitted
tightly on one collection's images, such a gate also refuses dermoscopy from other devices: one fitted on
HAM10000 validation alone refused 81 % of ISIC 2017 and, fitted on both collections, 39 % of HAM10000 test
images under a 15 % green cast and 50 % under JPEG quality 30 (`benchmarks/gate_study.py`). So the fit covers
acquisition, not one collection:

- each validation image also enters as `ACQUISITION_VARIANTS` copies as another device would take it (colour
  casts, exposure, blur, JPEG), seeded per image so a bundle's gate is reproducible;
- the covariance is shrunk half way to a scaled identity (`SHRINKAGE`), so that directions in which the
  fitting images happen to vary little (one clinic's lighting, one camera's optics) do not dominate the
  distance; Ledoit-Wolf picked about 0.02 here, fitted to the sample and not to the unseen sources;
- the threshold is the `QUANTILE` of the distances of held-out images (the other half, split by image so no
  copy of a fitted image sets it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from melanoma_detector.inference.predictor import mahalanobis

QUANTILE = 0.995
SHRINKAGE = 0.5
ACQUISITION_VARIANTS = 2
FEATURE = "gate_features"


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance (Ledoit & Wolf 2004): (1 - a) S + a mu I."""
    n, p = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    mu = np.trace(s) / p
    delta = ((s - mu * np.eye(p)) ** 2).sum() / p
    beta = sum((((row[:, None] * row[None, :]) - s) ** 2).sum() for row in xc) / (p * n * n)
    shrink = float(min(beta, delta) / delta) if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * np.eye(p), shrink


def shrunk_covariance(x: np.ndarray, shrinkage: float | str) -> tuple[np.ndarray, float]:
    """(1 - a) S + a mu I with a fixed `shrinkage` a in [0, 1], or a = Ledoit-Wolf's estimate ("ledoit-wolf")."""
    if shrinkage == "ledoit-wolf":
        return ledoit_wolf(x)
    a = float(shrinkage)
    if not 0 <= a <= 1:
        raise ValueError(f"shrinkage {shrinkage!r}: accepted a number in [0, 1] or 'ledoit-wolf'")
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / len(x)
    return (1 - a) * s + a * (np.trace(s) / len(s)) * np.eye(len(s)), a


def acquisition_variant(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`img` as another dermatoscope or camera might have taken it: independent per-channel gains of up to
    15 % (white balance), an exposure change of up to 25 %, and each with p = 0.3 a Gaussian blur (sigma
    0.5-1.5 px) and JPEG re-compression (quality 30-90). The same family `--augmentation acquisition`
    trains with, a little wider."""
    gains = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.75, 1.25)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) * gains.astype(np.float32)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    if rng.random() < 0.3:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=int(rng.integers(30, 91)))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def gate_features(predictor, images: Sequence[str | Path | Image.Image], *, variants: int = 0, seed: int = 0,
                  originals: bool = True, batch_size: int = 32, progress: bool = False,
                  desc: str = "gate features") -> tuple[np.ndarray, np.ndarray]:
    """Gate features of each image and of `variants` acquisition variants of it: (features, image index per row).
    With `originals=False` only the variants' rows, for callers that have already scored the images themselves.

    No gate is applied and a file that cannot be read raises, as export needs. Variants are seeded by
    (seed, image index), so the result does not depend on batching or on `originals`."""
    from tqdm import tqdm

    from melanoma_detector.data.io import load_image
    from melanoma_detector.preprocess import preprocess_image

    feats: list[np.ndarray] = []
    owner: list[int] = []
    batch: list[np.ndarray] = []

    def flush():
        if batch:
            feats.append(predictor.run(np.stack(batch))[FEATURE].astype(np.float64))
            batch.clear()

    for i, src in enumerate(tqdm(images, desc=desc, disable=not progress, leave=False)):
        img = src if isinstance(src, Image.Image) else load_image(src)
        rng = np.random.default_rng([seed, i])
        for k in range(0 if originals else 1, 1 + variants):
            batch.append(preprocess_image(img if k == 0 else acquisition_variant(img, rng), predictor.pp))
            owner.append(i)
            if len(batch) == batch_size:
                flush()
    flush()
    return (np.concatenate(feats) if feats else np.zeros((0, 0))), np.asarray(owner, dtype=np.int64)


def fit_ood(features: np.ndarray, groups: np.ndarray | None = None, *, quantile: float = QUANTILE,
            shrinkage: float | str = SHRINKAGE, variants: int = 0, images: str = "validation") -> dict[str, Any]:
    """Gaussian model of in-distribution gate features. Half the images (by `groups`: all rows of one image,
    its acquisition variants included, fall on one side) fit the mean and the shrunk covariance; the threshold
    is the `quantile` of the other half's Mahalanobis distances, so it is not set on the points it was fitted to."""
    groups = np.arange(len(features)) if groups is None else np.asarray(groups)
    ids = np.unique(groups)
    rng = np.random.default_rng(0)
    fit_ids = rng.permutation(ids)[: len(ids) // 2]
    in_fit = np.isin(groups, fit_ids)
    fit, held = features[in_fit], features[~in_fit]
    cov, shrink = shrunk_covariance(fit, shrinkage)
    mean = fit.mean(axis=0)
    # A small ridge keeps constant features (tiny or synthetic data) from making it singular.
    scale = float(np.trace(cov)) / len(cov)
    precision = np.linalg.inv(cov + (1e-6 * scale if scale > 0 else 1e-6) * np.eye(len(cov)))
    d = mahalanobis(held, {"mean": mean, "precision": precision})
    how = "Ledoit-Wolf" if shrinkage == "ledoit-wolf" else "fixed"
    return {
        "method": "Mahalanobis distance of the per-channel mean/std of the frozen backbone part's output "
                  f"(graph output {FEATURE}, {features.shape[1]} values; covariance shrunk towards a scaled "
                  f"identity, {how} shrinkage {shrink:.3f})",
        "feature": FEATURE,
        "mean": [float(v) for v in mean],
        "precision": [[float(v) for v in row] for row in precision],
        "threshold": float(np.quantile(d, quantile)),
        "threshold_rule": f"{quantile:.3f} quantile of distances of held-out {images} images (half of them"
                          + (f", each also as {variants} acquisition variants)" if variants else ")"),
        "acquisition_variants": int(variants),
        "n_fit": int(len(np.unique(groups[in_fit]))),
    }


def write_ood(out: Path, ood: dict[str, Any]) -> dict[str, Any]:
    """Store the gate's mean and precision matrix in `ood.npz` (a 1280x1280 matrix is ~1.3 MB of
    JSON that nobody reads); metadata.json keeps the rule, the threshold and the file's sha256."""
    from melanoma_detector.inference.bundle import OOD_FILE, sha256_file

    arrays = {k: np.asarray(ood[k], np.float64) for k in ("mean", "precision")}
    with (out / OOD_FILE).open("wb") as fh:
        np.savez(fh, **arrays)
    info = {k: v for k, v in ood.items() if k not in arrays}
    info.update(file=OOD_FILE, sha256=sha256_file(out / OOD_FILE))
    return info


def fit_bundle_gate(predictor, val_paths: Sequence[str], *, features: np.ndarray | None = None,
                    variants: int = ACQUISITION_VARIANTS, progress: bool = False,
                    images: str = "validation") -> dict[str, Any]:
    """The input gate of a bundle, fitted on its validation images and `variants` acquisition variants of each.
    `features`: the images' own gate features (one row per path) when the caller has scored them already, so
    that only the variants go through the graph."""
    if features is None:
        feats, owner = gate_features(predictor, val_paths, variants=variants, progress=progress, desc="gate fit")
        return fit_ood(feats, owner, variants=variants, images=images)
    features = np.asarray(features, np.float64)
    if len(features) != len(val_paths):
        raise ValueError(f"{len(features)} feature rows for {len(val_paths)} images: accepted one row per image")
    more, owner = gate_features(predictor, val_paths, variants=variants, originals=False, progress=progress,
                                desc="gate fit")
    feats = np.concatenate([features, more]) if len(more) else features
    return fit_ood(feats, np.concatenate([np.arange(len(features)), owner]), variants=variants, images=images)


def refit_bundle_gate(bundle_dir: str | Path, data: Sequence[str | Path], out_dir: str | Path, *,
                      split_file: str | Path, variants: int = ACQUISITION_VARIANTS,
                      progress: bool = True) -> dict[str, Any]:
    """A copy of a bundle in `out_dir` with its input gate re-fitted by this module's rule on the validation
    images of the split it trained with (the graph, calibration and thresholds are unchanged; the source bundle
    is never touched). For bundles whose gate was fitted by an earlier, tighter rule."""
    import datetime as _dt
    import shutil

    from melanoma_detector.data.discovery import discover_all
    from melanoma_detector.data.splits import apply_split_file, split_csv_fingerprint
    from melanoma_detector.errors import DataError, UserError
    from melanoma_detector.export.bundle import check_export_target, copy_fingerprints, staged_bundle, write_metadata
    from melanoma_detector.export.model_card import write_model_card
    from melanoma_detector.inference.predictor import Predictor

    out = Path(out_dir)
    check_export_target(out, source=bundle_dir)
    if variants < 0:
        raise UserError(f"--variants {variants}: accepted 0 or more")
    predictor = Predictor(bundle_dir, verify=True)
    meta = dict(predictor.bundle.metadata)
    expected = (meta.get("training") or {}).get("train_keys_sha256")
    if not Path(split_file).is_file():
        raise UserError(f"--split-file {split_file}: not found; accepted: the split file the bundle was trained with")
    if expected and split_csv_fingerprint(split_file) != expected:
        raise UserError(f"--split-file {split_file}: its training images are not the ones {bundle_dir} trained on; "
                        "accepted: the split file the bundle was trained with (its validation images must be unseen)")
    samples = apply_split_file([s for src in discover_all([str(d) for d in data]) for s in src.samples], split_file)
    val = [s.path for s in samples if s.split == "val"]
    test = [s.path for s in samples if s.split == "test"]
    if len(val) < 20:
        raise DataError(f"{len(val)} validation image(s) in {split_file}: too few to fit an input gate (accepted: 20 or more)")

    ood = fit_bundle_gate(predictor, val, variants=variants, progress=progress)
    # Written into a staged folder that becomes `out` only once the bundle is complete: an interrupted run leaves
    # no half bundle (an ood.npz alone) that its rerun would refuse as not empty.
    with staged_bundle(out) as stage:
        shutil.copy2(predictor.bundle.graph_path, stage / predictor.bundle.graph_path.name)
        copy_fingerprints(predictor.bundle.root, meta, stage)
        stamp = _dt.datetime.now(_dt.timezone.utc)
        meta["input_gate"] = {**(meta.get("input_gate") or {}), "ood": write_ood(stage, ood),
                              "refitted": {"by": "melanoma refit-gate", "date": stamp.date().isoformat(),
                                           "split_file": str(split_file), "n_val": len(val)}}
        meta["model_version"] = f"{meta.get('model_version', 'unknown')}+gate.{stamp:%Y%m%d}"
        if test and "test" in (meta.get("metrics") or {}):
            feats, _ = gate_features(predictor, test, progress=progress, desc="gate on test")
            meta["metrics"] = {**meta["metrics"], "test": {**meta["metrics"]["test"], "ood_refused_fraction":
                                                            float((mahalanobis(feats, ood) > ood["threshold"]).mean())}}
        write_metadata(stage, meta)
        write_model_card(stage, meta)
    return meta
