"""`melanoma export`: checkpoint -> model bundle (model.onnx + metadata.json + MODEL_CARD.md).

When the run's split (split.csv beside the checkpoint) points at images that exist, the bundle
is finished on them through the exported graph itself, so its numbers describe what is served:
temperature and operating points on validation, the out-of-distribution statistics of the input
gate on validation and acquisition variants of it (export/gate.py), and test metrics with 95%
bootstrap CIs resampled by lesion group.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_detector import CLASS_NAMES, DISCLAIMER, __version__
from melanoma_detector.config import training_data_paths
from melanoma_detector.data.fingerprints import FILE_NAME as FINGERPRINT_FILE
from melanoma_detector.errors import DataError, UserError
from melanoma_detector.export.gate import fit_bundle_gate, write_ood
from melanoma_detector.fileio import atomic_path
from melanoma_detector.inference.bundle import BUNDLE_FORMAT_VERSION, OOD_FILE, is_bundle_path
from melanoma_detector.preprocess import Preprocessing

log = logging.getLogger(__name__)

RISK_TEXTS = {
    "Low": (
        "Low estimated risk at this model's screening operating point. Keep examining your skin; "
        "have any lesion that changes in size, shape or colour checked by a clinician."
    ),
    "Moderate": (
        "Above the screening threshold: have this lesion examined by a dermatologist. "
        "Most lesions in this band are benign, but it should not be dismissed without examination."
    ),
    "High": (
        "High estimated risk: seek prompt assessment by a dermatologist "
        "(dermoscopy and, where the clinician decides, excision or biopsy)."
    ),
}
# Every file a bundle folder holds; `staged_bundle` replaces exactly these.
BUNDLE_FILES = ("model.onnx", "metadata.json", "MODEL_CARD.md", OOD_FILE, FINGERPRINT_FILE)
DATA_CREDITS = [
    {
        "name": "HAM10000",
        "citation": "Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of "
        "multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018).",
        "licence": "CC BY-NC-SA 4.0 (non-commercial, attribution, share-alike)",
    },
    {
        "name": "ISIC 2017 (Task 3 train + val)",
        "citation": "Codella N. et al. Skin lesion analysis toward melanoma detection: a challenge at the "
        "2017 ISBI, hosted by the ISIC. arXiv:1710.05006.",
        "licence": "ISIC Archive terms; cite the challenge",
    },
]


def _split_images(path: Path, data_paths: list[str], *, strict: bool,
                  ) -> tuple[list[dict[str, str]], list[dict[str, str]]] | None:
    """The split's val and test rows when every one of their images is at hand. Otherwise a split the
    user named (`strict`) is refused, and a run's own split.csv gives None and a warning that says why:
    the bundle is then written without data-derived statistics, as on a machine without the data."""
    from melanoma_detector.data.splits import read_split_rows

    try:
        rows = read_split_rows(path, data_paths=data_paths)
        val = [r for r in rows if r["split"] == "val"]
        test = [r for r in rows if r["split"] == "test"]
        missing = [r["path"] for r in val + test if not Path(r["path"]).is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} val/test image(s) not found, first: {missing[0]}; accepted: "
                            "a split whose images are on this machine")
        if not val:
            raise DataError(f"{path}: no val rows; accepted: a split with val images to calibrate on")
    except DataError as e:
        if strict:
            raise
        log.warning("%s; bundle has no data-derived statistics", e)
        return None
    return val, test


def metrics_with_ci(y: np.ndarray, p: np.ndarray, groups: list[str], thresholds: dict[str, float],
                    *, n_resamples: int = 1000) -> dict[str, Any]:
    """The bundle's metric block: its counts, then every metric of `melanoma evaluate` with a 95% interval
    from whole lesion groups resampled (seed 0), by the same code, so a card and a report agree."""
    from melanoma_detector.evaluation.bootstrap import metrics_with_ci as bootstrap_metrics

    out: dict[str, Any] = {"n": int(len(y)), "n_malignant": int(np.sum(y)), "n_groups": len(set(groups))}
    out.update(bootstrap_metrics(y, p, thresholds, groups=np.asarray(groups), n_resamples=n_resamples, seed=0))
    return out


def export_bundle(
    checkpoint: str | Path | list[str | Path],
    out_dir: str | Path,
    *,
    split_file: str | Path | None = None,
    use_data: bool = True,
    n_resamples: int = 1000,
    version: str | None = None,
    uncalibrated: bool = False,
    seen_fingerprints: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """`seen_fingerprints`: store perceptual hashes of the images the members trained on and export calibrated on
    (`data.fingerprints`), so that `melanoma evaluate` finds renamed, resized or re-encoded copies of them.

    `uncalibrated`: let a model be exported without validation images even when its calibration is unknown:
    an ensemble keeps its first member's calibration and thresholds, which do not describe the mean logit, and a
    checkpoint without calibration gets T=1, b=0 and thresholds 0.5 (for inspecting the graph only; `melanoma
    export` never does this)."""
    from melanoma_detector.data.splits import split_csv_fingerprint
    from melanoma_detector.evaluation.metrics import (
        apply_calibration,
        fit_operating_points,
    )
    from melanoma_detector.export.onnx_export import OUTPUT_NAMES, export_onnx, gate_fraction_of
    from melanoma_detector.inference.predictor import Predictor, run_graph
    from melanoma_detector.models.checkpoint import checkpoint_file, load_checkpoint

    paths = [checkpoint_file(c) for c in (checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint])]
    loaded = [load_checkpoint(c) for c in paths]
    # The first member's checkpoint supplies the split, training config and fallback calibration.
    ckpt_path, ckpt = paths[0], loaded[0][1]
    # Through Preprocessing, so that a key a member's older checkpoint lacks counts as its default.
    pp = Preprocessing.from_dict(ckpt["preprocessing"]).to_dict()
    for path, (_, member) in zip(paths[1:], loaded[1:]):
        theirs = Preprocessing.from_dict(member["preprocessing"]).to_dict()
        # Members see one preprocessed image. The centre-crop fraction only shapes evaluation (training
        # crops at random), so members may differ in it and are served at the first member's; the
        # bundle's metrics below are measured on exactly that.
        differ = sorted(k for k in pp if k != "crop_pct" and pp[k] != theirs[k])
        if differ:
            found = ", ".join(f"{k} {theirs[k]} against {pp[k]}" for k in differ)
            raise UserError(f"{path}: preprocessing differs from {paths[0]}'s in {found}; "
                            "accepted: ensemble members trained with the same input size, mean/std, interpolation, "
                            "resize mode and colour constancy (the centre-crop fraction may differ: the first "
                            "member's is used)")
        if theirs["crop_pct"] != pp["crop_pct"]:
            log.warning("%s: centre crop %s served at the first member's %s", path, theirs["crop_pct"], pp["crop_pct"])
    split_path = Path(split_file) if split_file else ckpt_path.parent / "split.csv"
    images = None
    if use_data and (split_file or split_path.is_file()):
        images = _split_images(split_path, training_data_paths(ckpt.get("config")), strict=bool(split_file))
    if images is not None and len({int(r["label"]) for r in images[0]}) < 2:
        raise DataError(f"{split_path}: its validation images hold one class only; calibration and thresholds are "
                        "fitted on benign and malignant ones; accepted: a split whose val rows hold both")
    if images is not None:
        _refuse_images_members_trained_on(split_path, images, paths)
    where = "--no-data" if not use_data else str(split_path)
    if images is None and len(loaded) > 1 and not uncalibrated:
        # A member's temperature and thresholds describe its own logit, not the mean of several: served as they
        # are, the ensemble's probabilities and its 95 %-sensitivity promise would be wrong.
        raise UserError("an ensemble's calibration and thresholds are fitted on validation images, and none were "
                        f"found ({where}); accepted: --split with the members' split (a run's split.csv, or a "
                        "keys-only split file whose images are in the data folders they trained on)")
    calibrated = ckpt.get("temperature") is not None and bool(ckpt.get("thresholds"))
    if images is None and not calibrated and not uncalibrated:
        # T=1 and thresholds 0.5 are no calibration: the card's "set on the validation split" would be untrue.
        raise UserError(f"{ckpt_path} holds no calibration (temperature and thresholds) and no validation images "
                        f"were found ({where}); accepted: --split with val images to calibrate on (a run's split.csv, "
                        "or a keys-only split file whose images are in the data folders it trained on), or a "
                        "checkpoint from `melanoma train`, which stores its calibration")
    if images is None and use_data and not split_path.is_file():
        log.warning("no split file %s: bundle keeps %s and has no input-gate statistics", split_path,
                    "the checkpoint's calibration and thresholds" if calibrated and len(loaded) == 1 else
                    "T=1, b=0 and thresholds 0.5 (uncalibrated)" if not calibrated else
                    "the first member's calibration and thresholds, which do not describe the mean logit")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fractions = [gate_fraction_of(c) for _, c in loaded]
    sha = export_onnx([m for m, _ in loaded], out / "model.onnx", input_size=int(pp["input_size"]),
                      gate_fraction=fractions)
    # Recorded only when every member trained on the same images: `--distill-from BUNDLE` checks it.
    fingerprints = {split_csv_fingerprint(p.parent / "split.csv") for p in paths}
    train_keys_sha256 = fingerprints.pop() if len(fingerprints) == 1 else None
    # Every member's data, not the first's: the credits and the most restrictive licence must not depend on order.
    data_paths = list(dict.fromkeys(str(p) for _, c in loaded for p in training_data_paths(c.get("config"))))
    backbone = ckpt["backbone"] if len(loaded) == 1 else \
        "mean-logit ensemble of " + " + ".join(c["backbone"] for _, c in loaded)
    thresholds = dict(ckpt.get("thresholds") or {"screening": 0.5, "high_specificity": 0.5})
    meta: dict[str, Any] = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model_version": version or f"{__version__}+{sha[:8]}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": f"melanoma-detector {__version__}",
        "backbone": backbone,
        "graph": {"file": "model.onnx", "sha256": sha, "opset": 17, "precision": "fp32",
                  "input": "image (B, 3, S, S) float32, preprocessed", "outputs": OUTPUT_NAMES},
        "preprocessing": pp,
        "class_names": list(ckpt.get("class_names", CLASS_NAMES)),
        "temperature": float(ckpt.get("temperature", 1.0)),
        "logit_bias": float(ckpt.get("logit_bias", 0.0)),
        "thresholds": thresholds,
        "input_gate": {"min_side": 64, "min_std": 4.0},
        "training": {
            "config": ckpt["config"],
            "best": ckpt.get("best"),
            **({"members": [{"checkpoint": str(path), "backbone": c["backbone"], "best": c.get("best"),
                             "config": c["config"]} for path, (_, c) in zip(paths, loaded)]}
               if len(loaded) > 1 else {}),
            "data": _data_credits(data_paths),
            "train_keys_sha256": train_keys_sha256,
        },
        "licence": "Model weights trained on HAM10000: CC BY-NC-SA 4.0 (non-commercial use only)"
        if _looks_like_shared(data_paths) else "see the training data's licence",
        "metrics": {"n_resamples": n_resamples, "proportion_intervals": "wilson-union"},
        "disclaimer": DISCLAIMER,
    }
    if images is not None:
        val, test = images
        # Served once to fit on, so a complete metadata.json, checkpoint calibration and all (re-fitted below).
        write_metadata(out, {**meta, "risk_tiers": risk_tiers(meta["thresholds"])})
        predictor = Predictor(out, verify=True)
        v = run_graph(predictor, [r["path"] for r in val], outputs=("logit", "gate_features"), progress=progress)
        v_logits = v["logit"]
        y_val = np.array([int(r["label"]) for r in val])
        temperature, logit_bias, thresholds = fit_operating_points(v_logits, y_val)
        p_val = apply_calibration(v_logits, temperature, logit_bias)
        meta.update(temperature=temperature, logit_bias=logit_bias, thresholds=thresholds)
        meta["calibration"] = {"method": "temperature scaling with a bias, p = sigmoid(logit / T + b), "
                                         "fitted on the validation split (NLL)", "n": int(len(val))}
        ood = fit_bundle_gate(predictor, [r["path"] for r in val], features=v["gate_features"])
        meta["input_gate"]["ood"] = write_ood(out, ood)
        groups_val = [r.get("group") or r["key"] for r in val]
        meta["metrics"]["val"] = metrics_with_ci(y_val, p_val, groups_val, thresholds, n_resamples=n_resamples)
        if test:
            t = run_graph(predictor, [r["path"] for r in test], outputs=("logit", "gate_features"),
                          progress=progress)
            t_logits, t_feats = t["logit"], t["gate_features"]
            y_test = np.array([int(r["label"]) for r in test])
            p_test = apply_calibration(t_logits, temperature, logit_bias)
            groups = [r.get("group") or r["key"] for r in test]
            meta["metrics"]["test"] = metrics_with_ci(y_test, p_test, groups, thresholds, n_resamples=n_resamples)
            predictor.set_ood(ood)
            meta["metrics"]["test"]["ood_refused_fraction"] = float(
                (predictor.ood_distance(t_feats) > ood["threshold"]).mean()
            )
        meta["splits"] = {"file": str(split_path), "val": len(val), "test": len(test)}
    (out / FINGERPRINT_FILE).unlink(missing_ok=True)  # stale from an earlier export into this folder
    seen = _write_fingerprints(out, paths, loaded, images[0] if images is not None else [], progress=progress) \
        if seen_fingerprints and use_data else None
    if seen is not None:
        meta["seen_images"] = seen
    meta["risk_tiers"] = risk_tiers(meta["thresholds"])
    write_metadata(out, meta)
    from melanoma_detector.export.model_card import write_model_card

    write_model_card(out, meta)
    return meta


def risk_tiers(thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Low below the screening threshold, High from the high-specificity one, Moderate between."""
    return [
        {"level": "Low", "min_probability": 0.0, "recommendation": RISK_TEXTS["Low"]},
        {"level": "Moderate", "min_probability": thresholds["screening"], "recommendation": RISK_TEXTS["Moderate"]},
        {"level": "High", "min_probability": max(thresholds["high_specificity"], thresholds["screening"]),
         "recommendation": RISK_TEXTS["High"]},
    ]


def _data_credits(paths: list[str]) -> list[dict[str, str]]:
    """Credit exactly the known collections a run trained on (a HAM10000-only run must not claim ISIC 2017)."""
    keys = {"HAM10000": "ham10000", "ISIC 2017 (Task 3 train + val)": "isic2017"}
    lowered = [str(p).lower() for p in paths]
    credits = [c for c in DATA_CREDITS if any(keys[c["name"]] in p for p in lowered)]
    known = tuple(keys.values())
    others = [str(p) for p in paths if not any(k in str(p).lower() for k in known)]
    return credits + ([{"name": ", ".join(others)}] if others else [])


def _looks_like_shared(paths: list[str]) -> bool:
    return any("ham10000" in str(p).lower() for p in paths)


def _write_fingerprints(out: Path, paths: list[Path], loaded: list[tuple[Any, dict[str, Any]]],
                        val: list[dict[str, str]], *, progress: bool = True) -> dict[str, Any] | None:
    """Hash the members' training images (each run's split.csv, train rows) and the validation images they chose
    their epoch on and export calibrated on into `out`/seen_images.npz; returns the metadata block, or None when no
    image was at hand."""
    from melanoma_detector.data.splits import read_split_rows

    train: list[str] = []
    seen_val = [r["path"] for r in val]
    for path, (_, member) in zip(paths, loaded):
        own = path.parent / "split.csv"
        if not own.is_file():
            continue  # said already by _refuse_images_members_trained_on
        try:
            rows = read_split_rows(own, data_paths=training_data_paths(member.get("config")))
        except DataError as e:
            log.warning("%s; its training images are not fingerprinted", e)
            continue
        train += [r["path"] for r in rows if r["split"] == "train"]
        seen_val += [r["path"] for r in rows if r["split"] == "val"]
    return write_fingerprints(out, train, seen_val, progress=progress)


def write_fingerprints(out: Path, train: list[str], val: list[str], *, progress: bool = True) -> dict[str, Any] | None:
    """seen_images.npz in `out` for these images; its metadata block, or None when none could be read."""
    from melanoma_detector.data.fingerprints import COPY_BITS, METHOD, fingerprint_images

    if not train and not val:
        return None
    seen = fingerprint_images({"train": train, "val": val}, progress=progress)
    if not len(seen.hashes):
        return None
    sha = seen.save(Path(out) / FINGERPRINT_FILE)
    if any(seen.missing.values()):
        log.warning("fingerprints: %s listed image(s) not found or unreadable, not fingerprinted",
                    " and ".join(f"{n} {r}" for r, n in seen.missing.items() if n))
    return {"file": FINGERPRINT_FILE, "sha256": sha, "method": METHOD, "copy_bits": COPY_BITS,
            "counts": seen.counts, "missing": seen.missing}


def fingerprint_bundle(bundle_dir: str | Path, split_file: str | Path, *,
                       data_paths: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Give an existing bundle the fingerprints export now writes, from the split its models trained on: the
    split's train rows and its val rows (where export fitted calibration). Refused unless the split's training
    images are the ones the bundle records (training.train_keys_sha256). The graph is untouched."""
    from melanoma_detector.data.splits import read_split_rows, split_csv_fingerprint
    from melanoma_detector.export.external import _bundle_data
    from melanoma_detector.inference.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    meta = dict(bundle.metadata)
    expected = (meta.get("training") or {}).get("train_keys_sha256")
    if not Path(split_file).is_file():
        raise UserError(f"--fingerprint-split {split_file}: not found; accepted: the split file the bundle's models "
                        "trained on")
    if not expected or split_csv_fingerprint(split_file) != expected:
        why = "the bundle records no fingerprint of its training images" if not expected else \
            "its training images are not the ones the bundle records (training.train_keys_sha256 differs)"
        raise UserError(f"--fingerprint-split {split_file}: {why}; accepted: the split file the bundle's models "
                        "trained on")
    folders = data_paths or _bundle_data(meta)
    rows = read_split_rows(split_file, data_paths=folders)
    block = write_fingerprints(bundle.root, [r["path"] for r in rows if r["split"] == "train"],
                               [r["path"] for r in rows if r["split"] == "val"], progress=progress)
    if block is None:
        raise DataError(f"--fingerprint-split {split_file}: none of its train or val images could be read under "
                        f"{', '.join(folders)}; accepted: the data folders the bundle trained on")
    meta["seen_images"] = block
    write_metadata(bundle.root, meta)
    from melanoma_detector.export.model_card import write_model_card

    write_model_card(bundle.root, meta)
    return meta


def _refuse_images_members_trained_on(split_path: Path, images: tuple[list[dict[str, str]], list[dict[str, str]]],
                                      members: list[Path]) -> None:
    """Calibration and metrics on an image a member trained on would be optimistic, silently: refuse a split
    whose val or test images are in any member's train split (its run's split.csv, matched by image key). A
    member without a split.csv cannot be checked, which is said."""
    from melanoma_detector.data.splits import _read_split_csv

    used = [r["key"] for r in images[0] + images[1]]
    for i, path in enumerate(members):
        own = path.parent / "split.csv"
        if not own.is_file():
            log.warning("%s: no split.csv beside it, so its training images cannot be checked against %s's "
                        "val/test images", path, split_path)
            continue
        train = {r["key"] for r in _read_split_csv(own)[0] if r["split"] == "train"}
        seen = [k for k in used if k in train]
        if seen:
            raise UserError(f"{split_path}: {len(seen)} of its val/test images are in the train split of member {i} "
                            f"({own}), first: {seen[0]}; accepted: a split none of whose val/test images any member "
                            "trained on (members trained on one split, exported with that split)")


def write_metadata(out: Path, meta: dict[str, Any]) -> None:
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            return v.item()
        return v

    text = json.dumps(clean(meta), indent=1, allow_nan=False)
    with atomic_path(out / "metadata.json") as tmp:  # `card` rewrites a live bundle's: never half a file
        tmp.write_text(text)


def check_export_target(out_dir: str | Path, *, overwrite: bool | None = None,
                        source: str | Path | None = None) -> None:
    """The --out of a command that writes a bundle: a new or empty folder, never the `source` bundle. With
    overwrite=True also a folder that holds a bundle, which `staged_bundle` then replaces only once the new
    one is complete; overwrite=None for commands that offer no --overwrite."""
    out = Path(out_dir)
    refuse_file_on_the_way(out, "a new or empty folder" + (", or a bundle with --overwrite" if overwrite is not None
                                                           else ""))
    if source is not None and out.exists() and out.resolve() == Path(source).resolve():
        raise UserError(f"--out {out}: is the source bundle; accepted: a new folder (the source bundle is never "
                        "changed)")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_bundle_path(out):
        raise UserError(f"--out {out}: exists and is not empty (and holds no model bundle); accepted: a new or "
                        "empty folder")
    if not overwrite:
        hint = ", or --overwrite to replace it once the new bundle is complete" if overwrite is False else ""
        raise UserError(f"--out {out}: exists and is not empty (it holds a model bundle); accepted: a new or "
                        f"empty folder{hint}")


def refuse_file_on_the_way(out: Path, accepted: str) -> None:
    """--out, or a folder above it, that is a file: a one-line refusal instead of mkdir's FileExistsError."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {out}: {p} is a file; accepted: {accepted}")


def copy_fingerprints(src_root: Path, meta: dict[str, Any], stage: Path) -> None:
    """A bundle made from another (recalibrate, refit-gate) keeps the same graph, so the same seen images."""
    info = meta.get("seen_images") or {}
    if info.get("file") and (Path(src_root) / info["file"]).is_file():
        shutil.copy2(Path(src_root) / info["file"], stage / FINGERPRINT_FILE)
    else:
        meta.pop("seen_images", None)


@contextmanager
def staged_bundle(out_dir: str | Path) -> Iterator[Path]:
    """A fresh folder beside `out_dir` to write a bundle into. When the block ends normally its files
    replace the bundle files of `out_dir` (other files there are left alone, and a bundle file the new
    bundle lacks is removed, so no stale ood.npz outlives it); when it raises, `out_dir` is untouched.
    A failed or interrupted export thus never leaves half a bundle where a working one was."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for name in BUNDLE_FILES:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
        leftover = sorted(p.name for p in stage.iterdir())
        if leftover:  # a file export_bundle writes must be listed in BUNDLE_FILES
            raise RuntimeError(f"export wrote files not in BUNDLE_FILES: {leftover}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
