"""`melanoma recalibrate`: a bundle's calibration and operating points re-fitted on labelled images of a new source.

Ranking carries across collections better than probabilities and thresholds do: the shipped recipe's screening
threshold, fitted for 95% sensitivity on its own validation split, keeps 81% of the melanomas of a collection it
never saw, and 98% at 6% specificity in the other direction (docs/model-development.md). A site with a few hundred
labelled images can fix that without retraining: the graph is copied unchanged, temperature, bias and thresholds are
re-fitted on part of the images, and the rest (whole lesion groups, held out) measure the result against the source
bundle's own calibration, so the new bundle's card shows what re-fitting bought.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_detector.config import RECALIBRATION_GATES as GATES
from melanoma_detector.errors import DataError, UserError

log = logging.getLogger(__name__)

SPLIT_FILE = "recalibration_split.csv"
MIN_MALIGNANT_FIT = 20  # below this a 95%-sensitivity threshold rests on one or two melanomas


def recalibrate_bundle(bundle_dir: str | Path, data: list[str | Path], out_dir: str | Path, *,
                       holdout: float = 0.3, seed: int = 0, gate: str = "refit", n_resamples: int = 1000,
                       progress: bool = True) -> dict[str, Any]:
    """`gate="refit"` also re-fits the input gate's out-of-distribution statistics on the fitting images: a gate
    fitted on the source's validation split refuses part of another collection (6% of ISIC 2017 for a gate fitted
    on HAM10000 alone; 81% under the rule before 2026-12-01), images the new source needs served. `"keep"` keeps
    the source gate and fits only on the images it accepts."""
    from melanoma_detector.data.discovery import discover_all, require_both_classes
    from melanoma_detector.evaluation.metrics import fit_operating_points
    from melanoma_detector.export.bundle import check_export_target, copy_fingerprints, staged_bundle, write_metadata
    from melanoma_detector.export.model_card import write_model_card
    from melanoma_detector.inference.bundle import OOD_FILE
    from melanoma_detector.inference.predictor import Predictor

    if gate not in GATES:
        raise UserError(f"gate {gate!r}; accepted: {', '.join(GATES)}")
    out = Path(out_dir)
    check_export_target(out, source=bundle_dir)
    samples = [s for src in discover_all([str(d) for d in data]) for s in src.samples]
    require_both_classes(samples, "recalibration data")
    predictor = Predictor(bundle_dir)
    src_meta = predictor.bundle.metadata
    # Images the model trained or chose its thresholds on fit it far too well (a temperature of 0.05 and a
    # screening threshold of 0.99999 were seen): recalibration is for a new source's images only.
    from melanoma_detector.evaluation.evaluate import model_images, training_overlap

    seen = model_images(predictor, bundle_dir)
    overlap = training_overlap(samples, seen, str(data[0]))
    copies = overlap.get("copies") or {}  # under another name, size or encoding (perceptual hash)
    n_train, n_val = (max(int(overlap.get(k) or 0), int(copies.get(k) or 0)) for k in ("train", "val"))
    if n_train or n_val:
        raise UserError(f"{', '.join(map(str, data))}: {n_train} training and {n_val} validation images of {bundle_dir} "
                        f"(or copies of them) among these {len(samples)}; accepted: labelled images of a new source "
                        "that the model never trained or validated on")

    sc = _score(predictor, samples, progress=progress)
    src_far = (predictor.ood_distance(sc.feats) > predictor.ood["threshold"] if predictor.ood is not None
               else np.zeros(len(sc.kept), bool))
    if gate == "keep" and src_far.any():
        sc.refused += [(str(s.path), "out of distribution for the input gate") for s, f in zip(sc.kept, src_far) if f]
        sc = _Scored(sc.logits[~src_far], sc.feats[~src_far], [s for s, f in zip(sc.kept, src_far) if not f],
                     sc.refused)
    if sc.refused:
        log.warning("%d image(s) cannot be assessed and are left out, e.g. %s: %s", len(sc.refused), *sc.refused[0])
    if not sc.kept:
        raise DataError("recalibration data: the source bundle's input gate refuses every image; use --gate refit")
    fit_i, held_i = _split(sc.kept, holdout, seed)
    y = np.array([s.label for s in sc.kept], dtype=np.int64)
    temperature, bias, thresholds = fit_operating_points(sc.logits[fit_i], y[fit_i])

    # Written into a staged folder that becomes `out` only once the bundle is complete: an interrupted run
    # (Ctrl-C in the bootstrap) leaves no half bundle that its rerun would refuse as not empty. The split record
    # is no bundle file (staged_bundle moves only those): it is written beside the stage and moved in last.
    out.parent.mkdir(parents=True, exist_ok=True)
    split_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.split-", dir=out.parent))
    split_tmp = split_dir / SPLIT_FILE
    try:
        with staged_bundle(out) as stage:
            held_refused_fraction = new_gate = None
            if gate == "refit":
                new_gate, held_i, held_refused_fraction = _refit_gate(predictor, sc, fit_i, held_i, stage)
            meta = _new_metadata(src_meta, temperature, bias, thresholds, n_fit=len(fit_i), n_resamples=n_resamples)
            if new_gate is not None:
                # the source's record of how its gate was fitted (by refit-gate, on its validation split) no longer holds
                gate_meta = {k: v for k, v in (meta.get("input_gate") or {}).items() if k != "refitted"}
                meta["input_gate"] = {**gate_meta, "ood": new_gate,
                                      "refitted": {"by": "melanoma recalibrate", "date": meta["created"][:10],
                                                   "data": [str(d) for d in data], "n_fit": len(fit_i)}}
            meta["recalibration"] = {
                "source_bundle": {"path": str(bundle_dir), "model_version": src_meta.get("model_version"),
                                  "temperature": src_meta.get("temperature"), "logit_bias": src_meta.get("logit_bias", 0.0),
                                  "thresholds": src_meta.get("thresholds"), "metrics": src_meta.get("metrics", {})},
                "data": [str(d) for d in data],
                "n_fit": len(fit_i), "n_fit_malignant": int(y[fit_i].sum()),
                "n_holdout": len(held_i), "n_holdout_malignant": int(y[held_i].sum()) if len(held_i) else 0,
                "holdout_fraction": holdout, "seed": seed, "n_cannot_assess": len(sc.refused),
                "gate": gate, "source_gate_refused_fraction": float(src_far.mean()),
                "holdout_refused_fraction": held_refused_fraction,
                "split_file": SPLIT_FILE,
            }
            if len(held_i):
                before, after = _measure_holdout(sc.logits[held_i], y[held_i], [sc.kept[i].group_key for i in held_i],
                                                 src_meta, temperature, bias, thresholds, n_resamples=n_resamples)
                # the card's test column: these images were never used to fit anything in this bundle
                meta["metrics"]["test"], meta["recalibration"]["holdout_before"] = after, before

            shutil.copy2(predictor.bundle.graph_path, stage / predictor.bundle.graph_path.name)
            ood = (src_meta.get("input_gate") or {}).get("ood") or {}
            if gate == "keep" and ood.get("file"):
                shutil.copy2(predictor.bundle.root / ood["file"], stage / OOD_FILE)
            copy_fingerprints(predictor.bundle.root, meta, stage)
            _write_split(split_tmp, [sc.kept[i] for i in fit_i], [sc.kept[i] for i in held_i], sc.refused)
            write_metadata(stage, meta)
            write_model_card(stage, meta)
        os.replace(split_tmp, out / SPLIT_FILE)
    finally:
        shutil.rmtree(split_dir, ignore_errors=True)
    return meta


@dataclass
class _Scored:
    """What one pass of the graph over the recalibration images gave: rows of `logits` and `feats` belong to
    `kept`; `refused` lists (path, reason) of the images left out."""

    logits: np.ndarray
    feats: np.ndarray
    kept: list
    refused: list[tuple[str, str]]


def _refit_gate(predictor, sc: _Scored, fit_i: np.ndarray, held_i: np.ndarray,
                stage: Path) -> tuple[dict[str, Any], np.ndarray, float | None]:
    """Fit the input gate on the fitting images and acquisition variants of each (export/gate.py, as `melanoma
    export` does), write it to `stage` and serve with it; the held-out rows it refuses are left out (and recorded),
    because the served bundle answers only what its gate accepts."""
    from melanoma_detector.export.gate import fit_bundle_gate, write_ood

    # The fitting images were scored by `_score`; only their acquisition variants still need the graph.
    new_ood = fit_bundle_gate(predictor, [str(sc.kept[i].path) for i in fit_i], features=sc.feats[fit_i],
                              images="recalibration")
    entry = write_ood(stage, new_ood)
    predictor.set_ood(new_ood)
    if not len(held_i):
        return entry, held_i, None
    far = predictor.ood_distance(sc.feats[held_i]) > new_ood["threshold"]
    sc.refused += [(str(sc.kept[i].path), "held out; out of distribution for the re-fitted gate") for i in held_i[far]]
    return entry, held_i[~far], float(far.mean())


def _split(kept: list, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of `kept` to fit on and to hold out (whole lesion groups, stratified); both must hold both classes."""
    from melanoma_detector.data.splits import holdout_split

    fit, held = holdout_split(kept, holdout, seed=seed)
    row = {id(s): i for i, s in enumerate(kept)}
    fit_i = np.array([row[id(s)] for s in fit], dtype=np.int64)
    held_i = np.array([row[id(s)] for s in held], dtype=np.int64)
    y = np.array([s.label for s in kept], dtype=np.int64)
    if len(np.unique(y[fit_i])) < 2:
        raise DataError("recalibration data: the fitting part holds one class only; give images of both classes")
    if holdout and len(np.unique(y[held_i])) < 2:
        raise DataError(f"recalibration data: the {holdout:.0%} held out holds one class only; give more images or "
                        "--holdout 0 (then nothing measures the result)")
    n_mal_fit = int(y[fit_i].sum())
    if n_mal_fit < MIN_MALIGNANT_FIT:
        log.warning("only %d melanoma(s) to fit on: the 95%%-sensitivity threshold rests on the lowest-scored few; "
                    "treat it as provisional", n_mal_fit)
    return fit_i, held_i


def _new_metadata(src_meta: dict[str, Any], temperature: float, bias: float, thresholds: dict[str, float], *,
                  n_fit: int, n_resamples: int) -> dict[str, Any]:
    """The source bundle's metadata with the re-fitted calibration; its metrics and external validation
    described the source calibration, so they are dropped rather than carried over."""
    from melanoma_detector.export.bundle import risk_tiers

    meta = {k: v for k, v in src_meta.items() if k not in ("metrics", "external_validation")}
    stamp = _dt.datetime.now(_dt.timezone.utc)
    meta.update(
        model_version=f"{src_meta.get('model_version', 'unknown')}+recal.{stamp:%Y%m%d}",
        created=stamp.isoformat(timespec="seconds"),
        temperature=temperature, logit_bias=bias, thresholds=thresholds, risk_tiers=risk_tiers(thresholds),
        calibration={"method": "temperature scaling with a bias, p = sigmoid(logit / T + b), re-fitted by "
                               "`melanoma recalibrate` (NLL)", "n": n_fit},
        metrics={"n_resamples": n_resamples, "proportion_intervals": "wilson-union"},
    )
    return meta


def _measure_holdout(logits: np.ndarray, y: np.ndarray, groups: list[str], src_meta: dict[str, Any],
                     temperature: float, bias: float, thresholds: dict[str, float], *,
                     n_resamples: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The held-out images' metrics under the source bundle's calibration and thresholds, then under the new ones."""
    from melanoma_detector.evaluation.metrics import apply_calibration
    from melanoma_detector.export.bundle import metrics_with_ci

    old = apply_calibration(logits, float(src_meta.get("temperature", 1.0)), float(src_meta.get("logit_bias", 0.0)))
    new = apply_calibration(logits, temperature, bias)
    return (metrics_with_ci(y, old, groups, dict(src_meta["thresholds"]), n_resamples=n_resamples),
            metrics_with_ci(y, new, groups, thresholds, n_resamples=n_resamples))


def _write_split(path: Path, fit, held, refused) -> None:
    """Which image fitted, which measured, which was left out: enough to audit or redo the numbers."""
    import csv

    from melanoma_detector.fileio import escape_formula as cell  # user text: spreadsheet-safe (`=x.jpg` -> `'=x.jpg`)

    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:  # a non-UTF-8 name keeps its bytes
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "role", "reason"])
        for role, part in (("fit", fit), ("holdout", held)):
            for s in part:
                w.writerow([cell(s.path), s.label, cell(s.group_key), role, ""])
        for p, why in refused:
            w.writerow([cell(p), "", "", "cannot_assess", cell(why)])


def _score(predictor, samples, *, progress: bool) -> _Scored:
    """Logits and gate features of every image that decodes and passes the size/uniformity gate; the others as
    (path, reason)."""
    from tqdm import tqdm

    prep = predictor.image_prep()
    feature = predictor.ood["feature"] if predictor.ood is not None else "gate_features"
    logits, feats, kept, refused = [], [], [], []
    batch, members = [], []

    def flush():
        if batch:
            outs = predictor.run(np.stack(batch))
            logits.extend(outs["logit"].reshape(-1))
            feats.extend(outs[feature])
            kept.extend(members)
            batch.clear()
            members.clear()

    for s in tqdm(samples, desc="recalibration pass", disable=not progress, leave=False):
        arr, reason = prep.load(str(s.path))
        if arr is None:
            refused.append((str(s.path), reason or "cannot be assessed"))
            continue
        batch.append(arr)
        members.append(s)
        if len(batch) == 32:
            flush()
    flush()
    if not kept:
        raise DataError("recalibration data: no image could be assessed")
    return _Scored(np.asarray(logits, np.float64), np.asarray(feats, np.float64), kept, refused)


