"""`melanoma evaluate`: score one or more labelled test sets with a model (optionally a second
one beside it) and write a report a clinical reader can check.

Output folder:

* ``report.html``: one self-contained page (plots embedded), see :mod:`report`;
* ``metrics.json``: everything in the report as data. ``sets`` holds one entry per ``--data``
  with every metric as ``{"value", "ci95": [low, high], "n_valid"}``; ``compare`` the
  side-by-side results and DeLong's test. The top level also repeats the first set's point
  metrics at the screening threshold (``n``, ``roc_auc``, ``sensitivity``, ...; the format of
  earlier versions), for scripts that read those;
* ``predictions.csv`` (every scored image, all sets), ``cannot_assess.csv`` (images the input gate
  refused) and, with a second model, ``predictions_compare.csv``;
* the plots as PNG files: in the output folder itself for a single set, else in one subfolder per
  set.

Images the model trained on, or chose its epoch, calibration and thresholds on (its val split), make figures
optimistic: each set's ``overlap`` counts them (``train``, ``val``; ``recalibration`` for a recalibrated bundle),
matched by the model's own split record (a run's split.csv; a bundle's split file, checked by its training
fingerprint) by real path, image key, or file name when size and first 64 KiB match too, and the console and
report warn. They are counted,
not refused; with no split record at hand ``checked`` is false and the log says so.

Images the input gate refuses (``status == "cannot_assess"``) are counted and listed, never
scored: a screening tool answers "cannot assess" for them, so the metrics describe the images it
does assess. Confidence intervals are 95 % percentile bootstrap intervals, resampling whole
lesions when the data names lesion groups (several images of one lesion are not independent).
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from melanoma_detector import CLASS_NAMES, DISCLAIMER, __version__
from melanoma_detector.calibration import sigmoid
from melanoma_detector.config import EVAL_SPLITS
from melanoma_detector.data.discovery import Sample, discover, require_both_classes
from melanoma_detector.errors import DataError, UserError
from melanoma_detector.export.external import _bundle_data, _overlaps  # as `card --external-eval` decides them
from melanoma_detector.fileio import escape_formula as _cell

__all__ = ["EVAL_SPLITS", "EvalSet", "evaluate_model", "evaluation_samples", "load_eval_sets", "model_info",
           "model_thresholds"]

log = logging.getLogger(__name__)

GALLERY_SIZE = 8
CANNOT_ASSESS_LISTED = 1000  # per set in metrics.json; cannot_assess.csv always has all


def evaluation_samples(path: str | Path, *, split_file: str | Path | None = None,
                       split: str | None = None) -> list[Sample]:
    """A folder of class subfolders, a root whose test/ holds them, or a manifest.

    With split folders, a split column or a `split_file` (a training run's split.csv, matched by
    key), the test split is used (val when there is no test), or `split` when given ("all": every image).
    """
    if split is not None and split not in EVAL_SPLITS:
        raise DataError(f"split {split!r}; accepted: {', '.join(EVAL_SPLITS)}")
    src = discover(path)
    if split_file is not None:
        from melanoma_detector.data.splits import apply_split_file

        apply_split_file(src.samples, split_file, require_complete=False)
    splits = {s.split for s in src.samples}
    if split == "all":  # a collection scored whole, e.g. an external one that ships its own splits
        chosen = src.samples
    elif split is not None and split not in splits:
        present = ", ".join(sorted(x for x in splits if x)) or "none (plain class folders)"
        raise DataError(f"{path}: no {split} split to evaluate on (splits present: {present}); "
                        "give split folders, a split column or a run's --split-file")
    elif splits == {None}:
        chosen = src.samples
    else:
        name = split or ("test" if "test" in splits else "val" if "val" in splits else None)
        if name is None:
            raise DataError(f"{path}: has split folders but no test/ or val/ to evaluate on")
        chosen = [s for s in src.samples if s.split == name]
    if src.non_images:  # a notes.txt beside the images is no image to score (as `data check` and `train` treat it)
        log.warning("%s: left out %d non-image file(s), first: %s", path, len(src.non_images), src.non_images[0])
    require_both_classes(chosen, f"evaluation data {path}")
    return chosen


@dataclass
class EvalSet:
    """One test set: the samples :func:`evaluation_samples` picks from one data path."""

    name: str
    data: str
    samples: list[Sample]
    split: str | None = None

    @property
    def slug(self) -> str:
        return _slug(self.name)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "set"


def _set_name(path: Path) -> str:
    if path.is_file():
        return path.parent.name if path.stem.lower() in ("labels", "manifest") else path.stem
    return path.resolve().name or "data"


def load_eval_sets(paths: str | Path | Sequence[str | Path], *, split_file: str | Path | None = None,
                   split: str | None = None) -> list[EvalSet]:
    """Read every data path first (a bad path fails before any model is loaded or run)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no evaluation data given (--data)")
    sets: list[EvalSet] = []
    used: set[str] = set()
    for raw in paths:
        samples = evaluation_samples(raw, split_file=split_file, split=split)
        name = _set_name(Path(raw).expanduser())
        base, k = name, 2
        while _slug(name) in used:
            name, k = f"{base}-{k}", k + 1
        used.add(_slug(name))
        splits = {s.split for s in samples}
        sets.append(EvalSet(name, str(raw), samples, next(iter(splits)) if len(splits) == 1 else None))
    return sets


# ------------------------------------------------------------------------------ the model


def model_thresholds(predictor) -> tuple[dict[str, float], str]:
    """The model's stored operating thresholds (screening first) and a note on where they came
    from. A bundle stores them; a checkpoint has them in ``ckpt["thresholds"]`` unless it
    predates them, then 0.5 is used."""
    found: Mapping[str, Any] | None = getattr(predictor, "thresholds", None)
    source = "model bundle"
    if not found and getattr(predictor, "ckpt", None) is not None:
        found, source = predictor.ckpt.get("thresholds"), "checkpoint"
    out: dict[str, float] = {}
    for k, v in dict(found or {}).items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    if not out:
        thr = float(getattr(predictor, "threshold", 0.5) or 0.5)
        return {"screening": thr}, f"the model stores no thresholds: {thr:g} used"
    if "screening" not in out:
        out = {"screening": float(getattr(predictor, "threshold", 0.5)), **out}
    out = {"screening": out["screening"], **{k: v for k, v in out.items() if k != "screening"}}
    return out, f"stored in the {source}"


def model_info(predictor, source: str | Path | None = None, *, tta: bool = False) -> dict[str, Any]:
    """What the report says about a model: kind, path, version, backbone, temperature,
    thresholds."""
    thresholds, note = model_thresholds(predictor)
    info: dict[str, Any] = {
        "path": str(source) if source is not None else None,
        "kind": type(predictor).__name__,
        "version": None, "backbone": None, "created": None,
        "temperature": float(getattr(predictor, "temperature", 1.0) or 1.0),
        "logit_bias": float(getattr(predictor, "logit_bias", 0.0) or 0.0),
        "thresholds": thresholds, "thresholds_note": note, "tta": bool(tta),
    }
    bundle = getattr(predictor, "bundle", None)
    ckpt = getattr(predictor, "ckpt", None)
    if bundle is not None:
        meta = getattr(bundle, "metadata", {}) or {}
        info.update(kind="model bundle (ONNX, torch-free)", version=meta.get("model_version"),
                    backbone=meta.get("backbone"), created=meta.get("created"),
                    software=meta.get("software"),
                    sha256=(meta.get("graph") or {}).get("sha256"),
                    trained_on=_bundle_data(meta)
                    # a recalibrated bundle's thresholds were fitted on these: not unseen either
                    + [str(d) for d in (meta.get("recalibration") or {}).get("data") or []])
        if info["path"] is None and getattr(bundle, "root", None) is not None:
            info["path"] = str(bundle.root)
    elif ckpt is not None:
        best = ckpt.get("best") or {}
        info.update(kind="torch checkpoint", backbone=ckpt.get("backbone"),
                    version=f"checkpoint (melanoma-detector {ckpt.get('package_version', '?')})",
                    best_val_auc=best.get("val_auc"), trained_on=_bundle_data({"training": ckpt}))
    return info


# ------------------------------------------------------------------------------ the model's own images


@dataclass
class _Seen:
    """The images a model used in one role (train, val, recalibration), indexed for set lookups: by real path
    (a subfolder of the training data, a folder of links, a manifest pointing into it), by key (a split file's
    "<data folder name>/<path under it>", so a copy of the whole folder elsewhere still matches) and by file
    name (a copy under another folder name). A key counts as it is: a re-encoded or shrunk copy of the data
    folder keeps its keys (another collection whose folder and file names are the same is warned about too, the
    safer mistake). A name alone counts only when the two files hold the same bytes as far as size and the first
    64 KiB tell: same-size BMPs and generic names such as 0001.jpg would otherwise match unrelated images."""

    keys: dict[str, str | None] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)
    names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str | None, path: str | None) -> None:
        real = os.path.realpath(path) if path else None
        if key:
            self.keys[key] = real
        if real:
            self.paths.add(real)
            self.names.setdefault(os.path.basename(real), []).append(real)

    def holds(self, key: str, real: str) -> bool:
        if real in self.paths:
            return True
        if key in self.keys:
            return True  # a copy of the data folder, re-encoded or shrunk ones too: a warning too many beats none
        return any(_same_bytes(real, t) for t in self.names.get(os.path.basename(real), ()))


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _same_bytes(a: str, b: str) -> bool:
    size = _size(a)
    return size is not None and size == _size(b) and _head_digest(a) == _head_digest(b)


@functools.lru_cache(maxsize=65536)
def _head_digest(path: str) -> str | None:
    import hashlib

    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read(65536)).hexdigest()
    except OSError:
        return None


@dataclass
class ModelImages:
    """What the evaluated model saw: `roles` (train and val when its split was found; recalibration for a
    bundle re-fitted by `melanoma recalibrate`), the split file read (`record`) or why none could be
    (`why_not`), and the data folders it trained on. `fingerprints`: a bundle's perceptual hashes of its training
    and validation images (`data.fingerprints`), which find copies under other names and sizes too."""

    roles: dict[str, _Seen]
    record: str | None
    why_not: str | None
    folders: list[str]
    fingerprints: Any = None
    fingerprints_note: str | None = None


def _bundle_fingerprints(meta: Mapping[str, Any], root: Path | None) -> tuple[Any, str | None]:
    """The bundle's seen-image fingerprints, or None and why not (a bundle from before them, a damaged file)."""
    from melanoma_detector.data.fingerprints import SeenImages

    info = meta.get("seen_images") or {}
    if not info.get("file") or root is None:
        return None, "the bundle has no fingerprints of its training images (exported before them, or without data)"
    try:
        return SeenImages.load(Path(root) / str(info["file"]), sha256=info.get("sha256")), None
    except DataError as e:
        log.warning("%s", e)
        return None, str(e)


def _roots(folders: Sequence[str]) -> dict[str, str]:
    """Data folder name (a key's first part) -> the folder its keys are relative to, as discovery names them."""
    out: dict[str, str] = {}
    for f in folders:
        p = Path(f).expanduser()
        root = p.parent if p.suffix.lower() == ".csv" else p  # a manifest: keys are relative to its folder
        out.setdefault(root.name, str(root))
    return out


def _split_roles(path: Path, folders: Sequence[str], roles: dict[str, _Seen], wanted=("train", "val")) -> None:
    """Add a split file's rows to `roles`: a run's split.csv names each image's path; a keys-only split file
    (configs/splits/default.csv) is placed in the training data folders by key."""
    from melanoma_detector.data.splits import _read_split_csv

    roots = _roots(folders)
    for row in _read_split_csv(path)[0]:
        if row.get("split") not in wanted:
            continue
        key = row.get("key") or ""
        where = row.get("path")
        if not where and "/" in key and key.split("/", 1)[0] in roots:
            where = os.path.join(roots[key.split("/", 1)[0]], key.split("/", 1)[1])
        roles.setdefault(row["split"], _Seen()).add(key, where)


def _recalibration_roles(meta: Mapping[str, Any], root: Path | None, roles: dict[str, _Seen]) -> None:
    """The images a recalibrated bundle's calibration and thresholds were fitted on (its
    recalibration_split.csv, rows with role "fit"), by path and by key under the recalibration's data folders."""
    from melanoma_detector.fileio import unescape_formula

    recal = meta.get("recalibration") or {}
    path = root / str(recal.get("split_file") or "recalibration_split.csv") if root is not None else None
    if not recal or path is None or not path.is_file():
        return
    roots = {name: os.path.normpath(r) for name, r in _roots([str(d) for d in recal.get("data") or []]).items()}
    seen = roles.setdefault("recalibration", _Seen())
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        for row in csv.DictReader(fh):
            if row.get("role") != "fit" or not row.get("path"):
                continue
            where = os.path.normpath(unescape_formula(row["path"]))
            key = next((f"{name}/{Path(os.path.relpath(where, r)).as_posix()}" for name, r in roots.items()
                        if where.startswith(r + os.sep)), None)
            seen.add(key, where)


def _bundle_images(meta: Mapping[str, Any], root: Path | None) -> ModelImages:
    """A bundle records the split file its export used (splits.file, relative to the folder export ran in), the
    split files its members trained with (their configs) and a fingerprint of their training images
    (training.train_keys_sha256): the first split file at hand with that fingerprint says which images they
    trained and chose their epoch on. Export fitted calibration and thresholds on splits.file's val images."""
    from melanoma_detector.data.splits import split_csv_fingerprint

    training = meta.get("training") or {}
    folders = _bundle_data(dict(meta))
    recorded = str((meta.get("splits") or {}).get("file") or "")
    where = [Path(recorded)] if recorded else []
    if recorded and not Path(recorded).is_absolute() and root is not None:
        where += [parent / recorded for parent in Path(root).resolve().parents[:3]]  # e.g. a clone's models/default
    recorded_at = next((p for p in where if p.is_file()), None)
    configs = [m.get("config") or {} for m in training.get("members") or []] or [training.get("config") or {}]
    trained_with = [str((c.get("data") or {}).get("split_file")) for c in configs
                    if (c.get("data") or {}).get("split_file")]
    named = list(dict.fromkeys([recorded, *trained_with] if recorded else trained_with))
    # A recorded path names the machine the bundle was made on (/work/main/configs/splits/default.csv); in another
    # clone the same file sits under the bundle's repository: its last parts under the bundle's parent folders.
    moved = [parent / Path(*Path(f).parts[-k:]) for f in trained_with for k in (1, 2, 3) if len(Path(f).parts) >= k
             for parent in (Path(root).resolve().parents[:3] if root is not None else ())]
    candidates = list(dict.fromkeys([*map(str, where), *trained_with, *map(str, moved)]))
    fingerprint = training.get("train_keys_sha256")
    roles: dict[str, _Seen] = {}
    split, why = None, None
    if not fingerprint:
        why = ("the bundle records no fingerprint of its training images (training.train_keys_sha256), so no "
               "split file can be shown to be the one it trained on")
    else:
        found = [p for p in candidates if Path(p).is_file()]
        for p in found:
            try:
                if split_csv_fingerprint(p) == fingerprint:
                    split = Path(p)
                    break
            except DataError:
                continue
        if split is None:
            why = (f"the split files it records ({', '.join(named)}) are not on this machine" if named and not found
                   else "it records no split file" if not found
                   else f"{', '.join(found)}: not the split it trained on (training.train_keys_sha256 differs)")
    if split is not None:
        _split_roles(split, folders, roles)
        if recorded_at is not None and recorded_at.resolve() != split.resolve():
            try:  # export calibrated on this file's val images
                _split_roles(recorded_at, folders, roles, wanted=("val",))
            except DataError as e:
                log.warning("%s", e)
    _recalibration_roles(meta, Path(root) if root is not None else None, roles)
    prints, note = _bundle_fingerprints(meta, root)
    return ModelImages(roles, None if split is None else str(split), why, folders, prints, note)


def model_images(predictor, source: str | Path | None = None) -> ModelImages:
    """What the evaluated model records about its own images: a bundle, its metadata (see `_bundle_images`); a
    checkpoint, the split.csv beside it (a run folder's, or one `melanoma unbundle` wrote)."""
    bundle = getattr(predictor, "bundle", None)
    ckpt = getattr(predictor, "ckpt", None)
    if bundle is not None:
        root = getattr(bundle, "root", None)
        return _bundle_images(getattr(bundle, "metadata", None) or {}, Path(root) if root is not None else None)
    if ckpt is None:
        return ModelImages({}, None, "the model records no training images", [])
    folders = _bundle_data({"training": ckpt})
    if source is None:
        return ModelImages({}, None, "the checkpoint's location is not known", folders)
    from melanoma_detector.models.checkpoint import checkpoint_file

    split = checkpoint_file(source).parent / "split.csv"
    if not split.is_file():
        return ModelImages({}, None, f"no split.csv beside {checkpoint_file(source)}", folders)
    roles: dict[str, _Seen] = {}
    try:
        _split_roles(split, folders, roles)
    except DataError as e:
        return ModelImages({}, None, str(e), folders)
    return ModelImages(roles, str(split), None, folders)


def training_overlap(samples: Sequence[Sample], seen: ModelImages, data: str) -> dict[str, Any]:
    """How many of the scored `samples` the model trained on (`train`), chose its epoch, calibration and
    thresholds on (`val`) and, for a recalibrated bundle, re-fitted them on (`recalibration`); None when its
    split could not be read (`checked` false, `note` says why). `in_training_folder`: whether the set's data lies
    in a folder the model trained on (so it is no external collection even with no image in common)."""
    checked = seen.record is not None
    reals = [os.path.realpath(s.path) for s in samples] if seen.roles else []
    out: dict[str, Any] = {"checked": checked, "of": len(samples), "split_file": seen.record}
    for role in ("train", "val", "recalibration"):
        idx = seen.roles.get(role)
        if idx is not None:
            out[role] = sum(idx.holds(s.key, r) for s, r in zip(samples, reals))
        elif role != "recalibration":
            out[role] = 0 if checked else None
    if not checked:
        out["note"] = f"could not be checked: {seen.why_not}"
    # Copies under another name, size or encoding, which the checks above cannot see: by perceptual hash.
    if seen.fingerprints is not None:
        from melanoma_detector.data.fingerprints import count_copies

        out["copies"] = count_copies(seen.fingerprints, [s.path for s in samples])
    else:
        out["copies"] = None
        out["copies_note"] = seen.fingerprints_note or "the model has no fingerprints of its training images"
    out["in_training_folder"] = _overlaps(str(Path(data).expanduser()), seen.folders) if seen.folders else None
    return out


# ------------------------------------------------------------------------------ scoring


@dataclass
class Scored:
    samples: list[Sample]  # assessed
    y: np.ndarray
    p: np.ndarray
    refused: list[tuple[Sample, str]] = field(default_factory=list)


def score_set(predictor, es: EvalSet, *, progress: bool = False) -> Scored:
    rows = predictor.predict_paths([s.path for s in es.samples], progress=progress)
    if len(rows) != len(es.samples):
        raise RuntimeError("the predictor returned a different number of results than images")
    refused = [(s, r.get("reason") or "cannot assess") for s, r in zip(es.samples, rows)
               if r.get("status") != "ok"]
    kept = [(s, r) for s, r in zip(es.samples, rows) if r.get("status") == "ok"]
    if not kept:
        raise DataError(f"cannot evaluate {es.data}: no image could be scored, first reason: "
                        f"{refused[0][1] if refused else 'none given'}")
    samples = [s for s, _ in kept]
    require_both_classes(samples, f"assessable images of {es.data}")
    y = np.array([s.label for s in samples], dtype=np.int64)
    p = np.array([float(r["probability_malignant"]) for _, r in kept], dtype=np.float64)
    return Scored(samples, y, p, refused)


def _groups(samples: Sequence[Sample]) -> np.ndarray | None:
    """Lesion group per sample when the data names groups (else None: plain bootstrap)."""
    if not any(s.group for s in samples):
        return None
    return np.array([s.group_key for s in samples], dtype=object)


def _uncalibrated(p: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """Raw model probabilities recovered from calibrated ones p = sigmoid(logit / T + b):
    sigmoid((logit(p) - b) * T)."""
    from melanoma_detector.evaluation.metrics import prob_to_logit

    return sigmoid((prob_to_logit(p) - float(bias)) * float(temperature))


# ------------------------------------------------------------------------------ one set


def _evaluate_set(predictor, info, es: EvalSet, set_dir: Path, out: Path, *, scored: Scored,
                  n_resamples: int, seed: int, prevalence: float | None) -> dict[str, Any]:
    from melanoma_detector.evaluation import metrics as M
    from melanoma_detector.evaluation import plots as P
    from melanoma_detector.evaluation.bootstrap import metrics_with_ci
    from melanoma_detector.evaluation.figures import plot_error_gallery, select_errors
    from melanoma_detector.evaluation.subgroups import subgroup_metrics, subgroup_values

    y, p, samples = scored.y, scored.p, scored.samples
    thresholds = info["thresholds"]
    screening = thresholds["screening"]
    groups = _groups(samples)
    metrics = metrics_with_ci(y, p, thresholds, groups=groups, n_resamples=n_resamples, seed=seed,
                              prevalence=prevalence)
    confusion = {name: M.confusion_at_threshold(y, p, thr) for name, thr in thresholds.items()}

    temperature, bias = info["temperature"], float(info.get("logit_bias", 0.0))
    p_raw = _uncalibrated(p, temperature, bias)
    calibration = {
        "temperature": temperature,
        "logit_bias": bias,
        "ece_before": M.expected_calibration_error(y, p_raw, 15),
        "ece_after": M.expected_calibration_error(y, p, 15),
        "brier_before": M.brier_score(y, p_raw),
        "brier_after": M.brier_score(y, p),
        "note": ("'before' = the model's raw probabilities (T = 1, b = 0), recovered as sigmoid((logit(p) - b) x T)"
                 + ("; with TTA the model averages probabilities over views, so this is approximate"
                    if info.get("tta") else "")
                 + ("; this model applies no calibration (T = 1, b = 0), so before and after coincide"
                    if abs(temperature - 1.0) < 1e-9 and bias == 0 else "")),
    }

    def rel(path: Path) -> str:
        return path.relative_to(out).as_posix()

    set_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, dict[str, str]] = {}

    def add(key: str, path: Path, title: str) -> None:
        plots[key] = {"file": rel(path), "title": f"{es.name}: {title}"}

    add("roc", P.plot_roc(y, p, set_dir / "roc.png", operating_points=thresholds,
                          title=f"ROC curve: {es.name}"), "ROC curve with operating points")
    add("pr", P.plot_pr(y, p, set_dir / "pr.png", title=f"Precision-recall: {es.name}"),
        "precision-recall curve")
    add("reliability", P.plot_reliability(
        y, p_raw, set_dir / "reliability.png", p_after=p,
        labels=("before (T = 1, b = 0)", f"after calibration (T = {temperature:.3g}, b = {bias:.3g})"),
        title=f"Reliability diagram: {es.name}"),
        "reliability diagram before and after temperature scaling")
    for name, thr in thresholds.items():
        fname = "confusion.png" if name == "screening" else f"confusion_{_slug(name)}.png"
        add(f"confusion_{name}", P.plot_confusion(
            confusion[name], set_dir / fname, title=f"{name} threshold {thr:.3g}: {es.name}"),
            f"confusion matrix at the {name} threshold ({thr:.3g})")
    add("score_histograms", P.plot_score_histograms(
        y, p, set_dir / "score_histograms.png", thresholds=thresholds,
        title=f"Scores by true class: {es.name}"), "score histograms per class")
    fn_idx, fp_idx = select_errors(y, p, screening, GALLERY_SIZE)
    errors = {
        "false_negatives": [{"path": samples[i].path, "probability": float(p[i])} for i in fn_idx],
        "false_positives": [{"path": samples[i].path, "probability": float(p[i])} for i in fp_idx],
    }
    add("error_gallery", plot_error_gallery(
        [(e["path"], e["probability"]) for e in errors["false_negatives"]],
        [(e["path"], e["probability"]) for e in errors["false_positives"]],
        set_dir / "error_gallery.png", threshold=screening,
        title=f"Most confident errors ({es.name})"),
        "gallery of the most confident false negatives and false positives at the screening threshold")

    all_meta = [s.meta for s in samples] + [s.meta for s, _ in scored.refused]
    values = subgroup_values(all_meta)
    subgroups = subgroup_metrics(
        y, p, {k: v[: len(samples)] for k, v in values.items()}, threshold=screening,
        refused_values={k: v[len(samples):] for k, v in values.items()},
        groups=groups, n_resamples=n_resamples, seed=seed,
    ) if values else {}

    n_mal = int(y.sum())
    return {
        "name": es.name,
        "data": es.data,
        "data_resolved": str(Path(es.data).expanduser().resolve()),  # `data` as typed is relative to the cwd of the run
        "split": es.split,
        "output_folder": rel(set_dir) if set_dir != out else ".",
        "n_listed": len(es.samples),
        "n": int(y.size),
        "n_malignant": n_mal,
        "n_benign": int(y.size - n_mal),
        "n_groups": int(len(set(groups.tolist()))) if groups is not None else int(y.size),
        "grouped_bootstrap": groups is not None,
        "n_cannot_assess": len(scored.refused),
        "n_cannot_assess_malignant": sum(1 for s, _ in scored.refused if s.label == 1),
        "cannot_assess": [{"path": s.path, "label": CLASS_NAMES[s.label], "reason": r}
                          for s, r in scored.refused[:CANNOT_ASSESS_LISTED]],
        "thresholds": dict(thresholds),
        "metrics": metrics,
        "confusion": confusion,
        "calibration": calibration,
        "subgroups": subgroups,
        "errors": errors,
        "plots": plots,
    }


def _compare_set(es: EvalSet, a: Scored, b: Scored, info_a, info_b, set_dir: Path, out: Path, *,
                 n_resamples: int, seed: int, prevalence: float | None) -> dict[str, Any]:
    """Both models on the images both could assess, with paired resamples and DeLong's test."""
    from melanoma_detector.evaluation import metrics as M
    from melanoma_detector.evaluation.bootstrap import metrics_with_ci
    from melanoma_detector.evaluation.figures import plot_roc_compare

    pb = {s.path: v for s, v in zip(b.samples, b.p)}
    keep = [i for i, s in enumerate(a.samples) if s.path in pb]
    samples = [a.samples[i] for i in keep]
    y = a.y[keep]
    p1 = a.p[keep]
    p2 = np.array([pb[s.path] for s in samples], dtype=np.float64)
    res: dict[str, Any] = {
        "name": es.name, "data": es.data, "n_common": int(y.size), "n_malignant": int(y.sum()),
        "n_cannot_assess_model": len(a.refused), "n_cannot_assess_compare": len(b.refused),
        "model": None, "compare": None, "delong": None, "plots": {},
        "note": "both models on the images both could assess; paired bootstrap resamples",
    }
    if y.size == 0 or len(set(y.tolist())) < 2:
        res["note"] = "the images both models could assess do not hold both classes: no comparison"
        return res
    groups = _groups(samples)
    opts = dict(groups=groups, n_resamples=n_resamples, seed=seed, prevalence=prevalence)
    res["model"] = metrics_with_ci(y, p1, info_a["thresholds"], **opts)
    res["compare"] = metrics_with_ci(y, p2, info_b["thresholds"], **opts)
    res["delong"] = M.delong_test(y, p1, p2, groups=groups)  # by lesion, as the bootstrap resamples
    path = plot_roc_compare(
        y, {"A": p1, "B": p2}, set_dir / "roc_compare.png",
        operating_points={"A": {"screening": info_a["thresholds"]["screening"]},
                          "B": {"screening": info_b["thresholds"]["screening"]}},
        title=f"ROC, A vs B on the same images: {es.name}")
    res["plots"]["roc_compare"] = {
        "file": path.relative_to(out).as_posix(),
        "title": f"{es.name}: ROC curves of both models on the same images (compare)"}
    return res


# ------------------------------------------------------------------------------ outputs


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _write_predictions(path: Path, items: list[tuple[EvalSet, Scored]], threshold: float) -> None:
    # the user's text (path, set name from a folder name, group from a manifest) is formula-escaped
    # (`fileio.escape_formula`, undone by export/external.py); the numbers are not
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "probability_malignant", "predicted_label", "set", "group"])
        for es, sc in items:
            for s, prob in zip(sc.samples, sc.p):
                w.writerow([_cell(s.path), CLASS_NAMES[s.label], f"{prob:.6f}",
                            CLASS_NAMES[int(prob >= threshold)], _cell(es.name), _cell(s.group or "")])


# Files that mark a folder as a training run or a model bundle: a report written into a run would
# replace its metrics.json and curves.png.
_NOT_A_REPORT_FOLDER = {"checkpoint.pt": "a training run", "config.yaml": "a training run",
                        "model.onnx": "a model bundle", "metadata.json": "a model bundle"}


def check_report_target(out_dir: str | Path) -> Path:
    """The --out of `melanoma evaluate`: a new folder or an earlier report's (rewritten); never a run
    folder or a bundle."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; accepted: a folder for the report")
    marker = next((name for name in _NOT_A_REPORT_FOLDER if (out / name).exists()), None)
    if marker:
        raise UserError(f"--out {out}: is {_NOT_A_REPORT_FOLDER[marker]} (it holds {marker}), whose files a report "
                        "would replace or mix with; accepted: a new folder, or an earlier report's")
    return out


def evaluate_model(
    predictor,
    data: str | Path | Sequence[str | Path] | Sequence[EvalSet],
    *,
    out_dir: str | Path,
    progress: bool = True,
    compare=None,
    prevalence: float | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    model_source: str | Path | None = None,
    compare_source: str | Path | None = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Score every set with ``predictor`` (and ``compare``, if given), write the report and
    return the metrics.json content.

    ``data``: one data path, several, or sets from :func:`load_eval_sets`. ``prevalence``: also
    report PPV/NPV re-weighted to this melanoma prevalence. ``model_source``/``compare_source``
    only name the models in the report.
    """
    from melanoma_detector.evaluation import metrics as M
    from melanoma_detector.evaluation.report import overlap_warning, write_report

    if prevalence is not None and not 0.0 < float(prevalence) < 1.0:
        raise UserError(f"--prevalence {prevalence}: expected a fraction between 0 and 1 (e.g. 0.02)")
    if n_resamples < 1:
        raise UserError(f"--resamples {n_resamples}: expected a positive integer")
    if isinstance(data, (str, Path)) or (data and not isinstance(data[0], EvalSet)):
        sets = load_eval_sets(data)  # type: ignore[arg-type]
    else:
        sets = list(data)  # type: ignore[arg-type]
    out = check_report_target(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    info = model_info(predictor, model_source, tta=tta)
    info_b = model_info(compare, compare_source, tta=tta) if compare is not None else None
    results: dict[str, Any] = {
        "disclaimer": DISCLAIMER,
        "software": f"melanoma-detector {__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "working_folder": str(Path.cwd()),  # what relative image paths in predictions.csv are relative to
        "model": info,
        "settings": {
            "n_resamples": int(n_resamples), "seed": int(seed), "confidence": 0.95,
            "proportion_intervals": "wilson-union",
            "interval": "percentile bootstrap; whole lesion groups resampled where the data names them",
            "prevalence": None if prevalence is None else float(prevalence),
            "tta": bool(tta), "ece_bins": 15, "partial_auc_min_tpr": 0.80,
            "small_subgroup": 30,
        },
        "sets": [],
    }
    if info_b is not None:
        results["compare"] = {"model": info_b, "sets": []}

    # Images the model trained or chose its epoch, calibration and thresholds on overstate its performance on new
    # ones: counted per set and said loudly, never refused (evaluating on training data can be deliberate).
    seen = model_images(predictor, model_source)
    info.update(training_split=seen.record, training_split_note=seen.why_not)
    if seen.record is None:
        log.warning("could not check which scored images the model trained on: %s", seen.why_not)
    seen_b = model_images(compare, compare_source) if compare is not None else None
    if seen_b is not None and seen_b.record is None:
        log.warning("could not check which scored images the compared model trained on: %s", seen_b.why_not)
    scored_a: list[tuple[EvalSet, Scored]] = []
    scored_b: list[tuple[EvalSet, Scored]] = []
    for es in sets:
        set_dir = out if len(sets) == 1 else out / es.slug
        sa = score_set(predictor, es, progress=progress)
        scored_a.append((es, sa))
        overlap = training_overlap(sa.samples, seen, es.data)
        warning = overlap_warning(es.name, overlap)
        if warning:
            log.warning("%s", warning)
        results["sets"].append({**_evaluate_set(
            predictor, info, es, set_dir, out, scored=sa, n_resamples=n_resamples, seed=seed,
            prevalence=prevalence), "overlap": overlap})
        if compare is not None:
            sb = score_set(compare, es, progress=progress)
            scored_b.append((es, sb))
            overlap_b = training_overlap(sb.samples, seen_b, es.data)
            warning = overlap_warning(f"{es.name} (model B)", overlap_b)
            if warning:
                log.warning("%s", warning)
            results["compare"]["sets"].append({**_compare_set(
                es, sa, sb, info, info_b, set_dir, out, n_resamples=n_resamples, seed=seed,
                prevalence=prevalence), "overlap": overlap_b})

    _write_predictions(out / "predictions.csv", scored_a, info["thresholds"]["screening"])
    if compare is not None:
        _write_predictions(out / "predictions_compare.csv", scored_b,
                           info_b["thresholds"]["screening"])
    else:  # stale from an earlier --compare run into the same folder
        for stale in (out / "predictions_compare.csv", out / "roc_compare.png", *out.glob("*/roc_compare.png")):
            stale.unlink(missing_ok=True)
    refused = [(es, s, r) for es, sc in scored_a for s, r in sc.refused]
    ca_path = out / "cannot_assess.csv"
    if refused:
        with ca_path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            w.writerow(["set", "path", "label", "reason"])
            for es, s, r in refused:
                w.writerow([_cell(es.name), _cell(s.path), CLASS_NAMES[s.label], _cell(r)])
    elif ca_path.exists():
        ca_path.unlink()  # stale from an earlier run into the same folder

    # the format of earlier versions: first set's point metrics at the screening threshold
    es0, sc0 = scored_a[0]
    legacy = M.binary_metrics(sc0.y, sc0.p, threshold=info["thresholds"]["screening"])
    legacy.update(data=str(es0.data), n_cannot_assess=len(sc0.refused),
                  cannot_assess=[{"path": s.path, "reason": r} for s, r in sc0.refused[:100]])
    results = {**results, **{k: v for k, v in legacy.items() if k not in results}}
    results["report"] = "report.html"
    results = _clean(results)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    write_report(results, out)
    return results
