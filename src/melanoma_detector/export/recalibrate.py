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
import shutil
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
    fitted on the source's validation split refuses most images of another collection (81% of ISIC 2017 for a
    HAM10000-only bundle), which would leave the new source nothing to serve. `"keep"` keeps the source gate and
    fits only on the images it accepts."""
    from melanoma_detector.data.discovery import discover_all, require_both_classes
    from melanoma_detector.data.splits import holdout_split
    from melanoma_detector.evaluation.metrics import (
        apply_calibration,
        fit_temperature_bias,
        threshold_for_sensitivity,
        threshold_for_specificity,
    )
    from melanoma_detector.export.bundle import fit_ood, metrics_with_ci, risk_tiers, write_metadata, write_ood
    from melanoma_detector.export.model_card import write_model_card
    from melanoma_detector.inference.bundle import OOD_FILE
    from melanoma_detector.inference.predictor import Predictor

    if gate not in GATES:
        raise UserError(f"gate {gate!r}; accepted: {', '.join(GATES)}")
    out = Path(out_dir)
    src_root = Path(bundle_dir).resolve()
    if out.exists() and (out.resolve() == src_root or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not empty; accepted: a new folder (the source bundle is never "
                        "changed)")
    samples = [s for src in discover_all([str(d) for d in data]) for s in src.samples]
    require_both_classes(samples, "recalibration data")
    predictor = Predictor(bundle_dir)
    src_meta = predictor.bundle.metadata

    logits, feats, kept, refused = _score(predictor, samples, progress=progress)
    src_far = (predictor.ood_distance(feats) > predictor.ood["threshold"] if predictor.ood is not None
               else np.zeros(len(kept), bool))
    if gate == "keep" and src_far.any():
        refused += [(str(s.path), "out of distribution for the input gate") for s, f in zip(kept, src_far) if f]
        logits, feats = logits[~src_far], feats[~src_far]
        kept = [s for s, f in zip(kept, src_far) if not f]
    if refused:
        log.warning("%d image(s) cannot be assessed and are left out, e.g. %s: %s", len(refused), *refused[0])
    if not kept:
        raise DataError("recalibration data: the source bundle's input gate refuses every image; use --gate refit")
    fit, held = holdout_split(kept, holdout, seed=seed)
    idx = {id(s): i for i, s in enumerate(kept)}
    fit_i = np.array([idx[id(s)] for s in fit], dtype=np.int64)
    held_i = np.array([idx[id(s)] for s in held], dtype=np.int64)
    y = np.array([s.label for s in kept], dtype=np.int64)
    groups = [s.group_key for s in kept]
    if len(np.unique(y[fit_i])) < 2:
        raise DataError("recalibration data: the fitting part holds one class only; give images of both classes")
    if holdout and len(np.unique(y[held_i])) < 2:
        raise DataError(f"recalibration data: the {holdout:.0%} held out holds one class only; give more images or "
                        "--holdout 0 (then nothing measures the result)")
    n_mal_fit = int(y[fit_i].sum())
    if n_mal_fit < MIN_MALIGNANT_FIT:
        log.warning("only %d melanoma(s) to fit on: the 95%%-sensitivity threshold rests on the lowest-scored few; "
                    "treat it as provisional", n_mal_fit)

    temperature, bias = fit_temperature_bias(logits[fit_i], y[fit_i])
    p_fit = apply_calibration(logits[fit_i], temperature, bias)
    thresholds = {"screening": float(threshold_for_sensitivity(y[fit_i], p_fit, 0.95)),
                  "high_specificity": float(threshold_for_specificity(y[fit_i], p_fit, 0.90))}

    meta = {k: v for k, v in src_meta.items() if k not in ("metrics", "external_validation")}
    stamp = _dt.datetime.now(_dt.timezone.utc)
    meta.update(
        model_version=f"{src_meta.get('model_version', 'unknown')}+recal.{stamp:%Y%m%d}",
        created=stamp.isoformat(timespec="seconds"),
        temperature=temperature, logit_bias=bias, thresholds=thresholds, risk_tiers=risk_tiers(thresholds),
        calibration={"method": "temperature scaling with a bias, p = sigmoid(logit / T + b), re-fitted by "
                               "`melanoma recalibrate` (NLL)", "n": len(fit_i)},
        metrics={"n_resamples": n_resamples},
    )
    out.mkdir(parents=True, exist_ok=True)
    held_refused_fraction = None
    if gate == "refit":
        new_ood = fit_ood(feats[fit_i])
        meta["input_gate"] = {**(meta.get("input_gate") or {}), "ood": write_ood(out, new_ood)}
        predictor.set_ood(new_ood)
        if len(held_i):
            # the served bundle answers only what its gate accepts: measure on exactly those
            far = predictor.ood_distance(feats[held_i]) > new_ood["threshold"]
            held_refused_fraction = float(far.mean())
            refused += [(str(kept[i].path), "held out; out of distribution for the re-fitted gate") for i in held_i[far]]
            held_i = held_i[~far]
            held = [kept[i] for i in held_i]
    meta["recalibration"] = {
        "source_bundle": {"path": str(bundle_dir), "model_version": src_meta.get("model_version"),
                          "temperature": src_meta.get("temperature"), "logit_bias": src_meta.get("logit_bias", 0.0),
                          "thresholds": src_meta.get("thresholds"), "metrics": src_meta.get("metrics", {})},
        "data": [str(d) for d in data],
        "n_fit": len(fit_i), "n_fit_malignant": n_mal_fit,
        "n_holdout": len(held_i), "n_holdout_malignant": int(y[held_i].sum()) if len(held_i) else 0,
        "holdout_fraction": holdout, "seed": seed, "n_cannot_assess": len(refused),
        "gate": gate, "source_gate_refused_fraction": float(src_far.mean()),
        "holdout_refused_fraction": held_refused_fraction,
    }
    if len(held_i):
        g = [groups[i] for i in held_i]
        old = apply_calibration(logits[held_i], float(src_meta.get("temperature", 1.0)),
                                float(src_meta.get("logit_bias", 0.0)))
        new = apply_calibration(logits[held_i], temperature, bias)
        # the card's test column: these images were never used to fit anything in this bundle
        meta["metrics"]["test"] = metrics_with_ci(y[held_i], new, g, thresholds, n_resamples=n_resamples)
        meta["recalibration"]["holdout_before"] = metrics_with_ci(
            y[held_i], old, g, dict(src_meta["thresholds"]), n_resamples=n_resamples)

    shutil.copy2(predictor.bundle.graph_path, out / predictor.bundle.graph_path.name)
    ood = (src_meta.get("input_gate") or {}).get("ood") or {}
    if gate == "keep" and ood.get("file"):
        shutil.copy2(predictor.bundle.root / ood["file"], out / OOD_FILE)
    meta["recalibration"]["split_file"] = SPLIT_FILE
    _write_split(out / SPLIT_FILE, fit, held, refused)
    write_metadata(out, meta)
    write_model_card(out, meta)
    return meta


def _write_split(path: Path, fit, held, refused) -> None:
    """Which image fitted, which measured, which was left out: enough to audit or redo the numbers."""
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "role", "reason"])
        for role, part in (("fit", fit), ("holdout", held)):
            for s in part:
                w.writerow([s.path, s.label, s.group_key, role, ""])
        for p, why in refused:
            w.writerow([p, "", "", "cannot_assess", why])


def _score(predictor, samples, *, progress: bool) -> tuple[np.ndarray, np.ndarray, list, list[tuple[str, str]]]:
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
    return np.asarray(logits, np.float64), np.asarray(feats, np.float64), kept, refused


