"""Metrics per subgroup (sex, age band, body site, diagnosis) from manifest metadata.

Only attributes that the manifest actually has are reported (HAM10000's labels.csv: ``sex``,
``age``, ``localization``, ``dx``; ISIC-style names are accepted too). Every subgroup is listed
with its counts, however small: groups under :data:`SMALL_GROUP` assessed cases are *flagged*,
not hidden, because a wide interval on a small group is itself the finding.

A subgroup with a single class has no AUC; it still gets the sensitivity (malignant-only groups,
e.g. ``dx = mel``) or the specificity (benign-only groups, e.g. ``dx = nv``) at the screening
threshold, which is what matters for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from melanoma_detector.evaluation.bootstrap import metrics_with_ci

SMALL_GROUP = 30
UNKNOWN = "unknown"
AGE_BANDS = ("<30", "30-49", "50-69", ">=70", UNKNOWN)
# attribute -> accepted manifest column names (case-insensitive), first match wins
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "sex": ("sex", "gender"),
    "age band": ("age", "age_approx"),
    "localization": ("localization", "anatom_site_general_challenge", "anatom_site_general",
                     "anatomic_site", "site"),
    "dx": ("dx", "diagnosis"),
}
_MISSING = {"", "nan", "none", "null", "na", "n/a", "unknown", "?"}


def age_band(value: Any) -> str:
    """``<30``, ``30-49``, ``50-69``, ``>=70`` or ``unknown`` for a missing/unreadable age."""
    try:
        age = float(str(value).strip())
    except (TypeError, ValueError):
        return UNKNOWN
    if not math.isfinite(age) or age < 0:
        return UNKNOWN
    if age < 30:
        return "<30"
    if age < 50:
        return "30-49"
    if age < 70:
        return "50-69"
    return ">=70"


def _column(metas: Sequence[Mapping[str, Any]], names: tuple[str, ...]) -> str | None:
    keys: dict[str, str] = {}
    for m in metas:
        for k in m:
            if k is not None:
                keys.setdefault(str(k).strip().lower(), k)
    for name in names:
        col = keys.get(name)
        if col is not None and any(str(m.get(col) or "").strip().lower() not in _MISSING
                                   for m in metas):
            return col
    return None


def subgroup_values(metas: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """``{attribute: [value per sample]}`` for the attributes present in the metadata."""
    out: dict[str, list[str]] = {}
    for attr, names in ATTRIBUTES.items():
        col = _column(metas, names)
        if col is None:
            continue
        if attr == "age band":
            out[attr] = [age_band(m.get(col)) for m in metas]
        else:
            vals = []
            for m in metas:
                v = str(m.get(col) or "").strip()
                vals.append(UNKNOWN if v.lower() in _MISSING else v.lower())
            out[attr] = vals
    return out


def _order(attr: str, values: set[str]) -> list[str]:
    if attr == "age band":
        return [b for b in AGE_BANDS if b in values]
    return sorted(values, key=lambda v: (v == UNKNOWN, v))


def subgroup_metrics(
    y: np.ndarray,
    p: np.ndarray,
    values: Mapping[str, Sequence[str]],
    *,
    threshold: float,
    refused_values: Mapping[str, Sequence[str]] | None = None,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Per attribute, one row per value: ``value``, ``n`` (assessed cases), ``n_malignant``,
    ``n_benign``, ``n_cannot_assess``, ``roc_auc``, ``sensitivity``, ``specificity`` (each
    ``{"value", "ci95"}`` or ``None`` where the group lacks the class it needs), ``small``
    (fewer than :data:`SMALL_GROUP` assessed cases) and ``note``; benign-only diagnoses (``dx``)
    also get ``roc_auc_vs_malignant``: every malignant case of the set against that diagnosis.

    ``values`` holds one value per assessed sample (aligned with ``y``/``p``);
    ``refused_values`` one per image the input gate refused, for their counts.
    """
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(p, dtype=np.float64)
    out: dict[str, list[dict[str, Any]]] = {}
    for attr, vals in values.items():
        vals_arr = np.asarray(list(vals), dtype=object)
        refused = list((refused_values or {}).get(attr, []))
        rows = []
        for v in _order(attr, set(vals_arr.tolist()) | set(refused)):
            mask = vals_arr == v
            yv, pv = y[mask], p[mask]
            n, n_mal = int(mask.sum()), int(yv.sum())
            row: dict[str, Any] = {
                "value": v, "n": n, "n_malignant": n_mal, "n_benign": n - n_mal,
                "n_cannot_assess": sum(1 for r in refused if r == v),
                "roc_auc": None, "sensitivity": None, "specificity": None,
                "small": n < SMALL_GROUP, "note": "",
            }
            if n:
                ci = metrics_with_ci(
                    yv, pv, {"screening": threshold}, groups=None if groups is None else groups[mask],
                    n_resamples=n_resamples, seed=seed, calibration=False,
                )
                if n_mal and n - n_mal:
                    row["roc_auc"] = _pick(ci["roc_auc"])
                if n_mal:
                    row["sensitivity"] = _pick(ci["sensitivity@screening"])
                if n - n_mal:
                    row["specificity"] = _pick(ci["specificity@screening"])
            if attr == "dx" and n and not n_mal and y.any():
                # A benign diagnosis has no AUC of its own; "melanoma vs this diagnosis" (every malignant
                # case in the set against this group) says which look-alikes the model confuses, as in
                # the ISIC challenges' melanoma-vs-nevus and -vs-keratosis figures.
                both = mask | (y == 1)
                ci = metrics_with_ci(y[both], p[both], {},  # ranking metrics only: no thresholds needed
                                     groups=None if groups is None else groups[both],
                                     n_resamples=n_resamples, seed=seed, calibration=False)
                row["roc_auc_vs_malignant"] = _pick(ci["roc_auc"])
            notes = []
            if row["small"]:
                notes.append(f"fewer than {SMALL_GROUP} cases: interpret with caution")
            if n and (n_mal == 0 or n_mal == n):
                notes.append("one class only: no AUC; "
                             + ("sensitivity" if n_mal else "specificity") + " reported")
            row["note"] = "; ".join(notes)
            rows.append(row)
        out[attr] = rows
    return out


def _pick(m: Mapping[str, Any]) -> dict[str, Any]:
    return {"value": m["value"], "ci95": list(m["ci95"])}
