"""External validation recorded in a bundle: figures from `melanoma evaluate` on images the evaluated model
never trained on.

Every figure a bundle gets at export time comes from the collections it trained on. A reader judging the
model for another clinic needs the out-of-source figures too, and needs them for *this* bundle, so they live
in its metadata.json (read back by the model card), not in a template. When the bundle itself was evaluated
the entry says so; otherwise it is a proxy (for example the same recipe trained without the test collection)
and must carry a note saying how that model relates to the bundle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from melanoma_detector.errors import UserError

METRIC_KEYS = ("roc_auc", "average_precision", "sensitivity@screening", "specificity@screening",
               "specificity_at_95_sensitivity", "ece")


def read_external_evaluation(eval_dir: str | Path, *, bundle_meta: dict[str, Any],
                             note: str | None = None) -> list[dict[str, Any]]:
    """One entry per data set scored in an evaluate run folder (its metrics.json)."""
    path = Path(eval_dir) / "metrics.json"
    try:
        report = json.loads(path.read_text())
        model, sets = report["model"], report["sets"]
    except FileNotFoundError:
        raise UserError(f"--external-eval {eval_dir}: no metrics.json; accepted: an output folder of "
                        "`melanoma evaluate --out DIR`") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"--external-eval {eval_dir}: metrics.json is not a `melanoma evaluate` report "
                        "(needs its 'model' and 'sets' entries)") from None
    if not isinstance(model, dict) or not isinstance(sets, list) or not all(
            isinstance(s, dict) and {"n", "n_malignant", "metrics"} <= s.keys() for s in sets):
        raise UserError(f"--external-eval {eval_dir}: metrics.json is not a `melanoma evaluate` report "
                        "(each of its 'sets' needs n, n_malignant and metrics)")
    sha = (bundle_meta.get("graph") or {}).get("sha256")
    differs = _differences(model, bundle_meta)
    same = not differs
    if not same and not (note or "").strip():
        why = (f"it scored {model.get('path')!r}, not this bundle (graph sha256 {str(sha)[:12]})"
               if "graph sha256" in differs else
               f"it scored {model.get('path')!r}, the same graph served with another {', '.join(differs)} than this "
               "bundle's, so its figures are not this bundle's")
        raise UserError(f"--external-eval {eval_dir}: {why}; a proxy evaluation needs --note saying how that model "
                        "relates to this bundle, e.g. 'the same recipe trained on HAM10000 alone'")
    trained_on = model.get("trained_on")
    if trained_on is None:
        trained_on = _run_data_paths(model.get("path"))
    # What the figures must not have seen: the evaluated model's training (and calibration) data; when that model
    # is this bundle, its own metadata says so too, whatever the report recorded; and whatever model was scored,
    # the images this bundle's calibration and thresholds were re-fitted on are not a new collection for it.
    recal = [str(d) for d in (bundle_meta.get("recalibration") or {}).get("data") or []]
    own = _bundle_data(bundle_meta) if same else []
    if own:
        trained_on = _unique([*(trained_on or []), *own, *recal])
    checked = _unique([*(trained_on or []), *recal])
    # relative paths are relative to where evaluate ran, not to where this runs
    base = Path(report.get("working_folder") or Path(eval_dir).resolve().parent)
    scored = _scored_paths(Path(eval_dir), base) if checked else {}
    entries = []
    for s in sets:
        data = str(s.get("data", ""))
        # The set's folder, and every image it scored: a manifest, or a folder of links, can list
        # training images from anywhere.
        inside = next((q for q in [str(s.get("data_resolved") or data), *scored.get(s.get("name"), [])]
                       if _overlaps(q, checked)), None) if checked else None
        if inside is not None:
            if _overlaps(inside, trained_on or []):
                whose, accepted = "the data the evaluated model trained or was calibrated on", "images that model never saw"
            else:
                whose = "the data this bundle's calibration and thresholds were re-fitted on (`melanoma recalibrate`)"
                accepted = "images neither that model nor this bundle's recalibration saw"
            raise UserError(f"--external-eval {eval_dir}: set {s.get('name')!r} ({data}) holds images of {whose} "
                            f"({', '.join(checked)}; first: {inside}); accepted: {accepted}")
        copies = {k: int(v or 0) for k, v in ((s.get("overlap") or {}).get("copies") or {}).items()}
        if copies.get("train") or copies.get("val"):
            raise UserError(f"--external-eval {eval_dir}: set {s.get('name')!r} ({data}) holds copies of images the "
                            f"evaluated model trained on ({copies.get('train', 0)}) or was calibrated on "
                            f"({copies.get('val', 0)}) under another name, size or encoding (found by perceptual "
                            "hash); accepted: images that model never saw")
        unseen = None if trained_on is None else True  # None: reports written before models recorded their data
        entries.append({
            "data": data,
            "split": s.get("split"),
            "n": int(s["n"]),
            "n_malignant": int(s["n_malignant"]),
            # the figures cover the images the gate accepted: how many it turned away belongs beside them
            "n_cannot_assess": int(s.get("n_cannot_assess") or 0),
            "metrics": {k: s["metrics"][k] for k in METRIC_KEYS if k in (s.get("metrics") or {})},
            "thresholds": s.get("thresholds"),
            "evaluated_model": {k: model.get(k) for k in ("path", "kind", "version", "backbone", "sha256", "best_val_auc")},
            "trained_on": trained_on,
            "same_model": same,
            "unseen_verified": unseen,
            "note": (note or "").strip() or None,
            "evaluated": report.get("created"),
            "tta": bool(model.get("tta")),
        })
    if not entries:
        raise UserError(f"--external-eval {eval_dir}: the report scored no data set")
    return entries


def _differences(model: dict[str, Any], bundle_meta: dict[str, Any]) -> list[str]:
    """What keeps an evaluated model from being the bundle: its graph, and the calibration and thresholds
    the bundle serves (a recalibrated bundle keeps its source's graph, not its figures); the version too,
    when the report recorded one. Something a report left out cannot be shown to match."""
    sha = (bundle_meta.get("graph") or {}).get("sha256")
    if not sha or model.get("sha256") != sha:
        return ["graph sha256"]
    out = []
    if not _close(model.get("temperature"), bundle_meta.get("temperature", 1.0)):
        out.append("temperature")
    if not _close(model.get("logit_bias", 0.0), bundle_meta.get("logit_bias", 0.0)):
        out.append("logit bias")
    mine, theirs = bundle_meta.get("thresholds") or {}, model.get("thresholds")
    if not isinstance(theirs, dict) or set(theirs) != set(mine) or not all(_close(theirs[k], mine[k]) for k in mine):
        out.append("thresholds")
    if model.get("version") is not None and model.get("version") != bundle_meta.get("model_version"):
        out.append("model version")
    return out


def _close(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def _bundle_data(meta: dict[str, Any]) -> list[str]:
    """The data folders a bundle's own metadata says it trained on (every member's, for an ensemble)."""
    training = meta.get("training") or {}
    configs = [m.get("config") or {} for m in training.get("members") or []] or [training.get("config") or {}]
    return _unique([str(p) for cfg in configs for p in (cfg.get("data") or {}).get("paths") or []])


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _scored_paths(eval_dir: Path, base: Path) -> dict[str, list[str]]:
    """Every image path an evaluate run scored or refused, by set name."""
    import csv

    from melanoma_detector.fileio import unescape_formula

    out: dict[str, list[str]] = {}
    for name in ("predictions.csv", "cannot_assess.csv"):
        f = eval_dir / name
        if f.is_file():
            with f.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
                for row in csv.DictReader(fh):
                    if row.get("path"):  # evaluate wrote `'=x.jpg` for =x.jpg (a spreadsheet-safe cell)
                        out.setdefault(unescape_formula(row.get("set") or ""), []).append(
                            str(base / unescape_formula(row["path"])))
    return out


def _run_data_paths(model_path: str | None) -> list[str] | None:
    """Reports written before evaluate recorded `trained_on`: read it from the run folder's config.yaml."""
    if not model_path:
        return None
    path = Path(model_path)
    cfg = path / "config.yaml" if path.is_dir() else path.parent / "config.yaml"
    if not cfg.is_file():
        return None
    import yaml

    try:
        paths = ((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("paths")
    except yaml.YAMLError:
        return None
    return [str(p) for p in paths] if isinstance(paths, list) else None


def _overlaps(data: str, trained_on: list[str]) -> bool:
    """Whether an evaluated folder lies inside (or contains) a training folder. A held-out split of a
    training collection overlaps too: external means a collection the model never drew from."""
    d = Path(data).expanduser().resolve()
    for t in trained_on:
        t = Path(t).resolve()
        if d == t or t in d.parents or d in t.parents:
            return True
    return False


def add_external(meta: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Record entries in a bundle's metadata, replacing an earlier entry for the same model and data."""
    def key(e):
        return (e["data"], e.get("split"), e["evaluated_model"].get("path"), e["evaluated_model"].get("sha256"))

    new = {key(e) for e in entries}
    kept = [e for e in meta.get("external_validation") or [] if key(e) not in new]
    meta["external_validation"] = kept + entries
    return meta


def record_external(bundle_dir: str | Path, eval_dirs: list[str | Path], *, note: str | None = None) -> dict[str, Any]:
    """Add evaluate runs to a bundle's metadata.json and re-render its MODEL_CARD.md. The graph is untouched
    (its sha256 is checked first), so a bundle can gain external figures long after its export."""
    from melanoma_detector.export.bundle import write_metadata
    from melanoma_detector.export.model_card import write_model_card
    from melanoma_detector.inference.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    meta = dict(bundle.metadata)
    for d in eval_dirs:
        add_external(meta, read_external_evaluation(d, bundle_meta=meta, note=note))
    write_metadata(bundle.root, meta)
    write_model_card(bundle.root, meta)
    return meta
