"""The evaluation report: one self-contained HTML page (plots embedded as base64 PNG, no external
files, scripts or fonts) and a compact terminal summary, both built from the metrics.json
content that :func:`evaluate.evaluate_model` writes.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from melanoma_detector import DISCLAIMER

__all__ = ["format_summary", "overlap_warning", "render_html", "write_report"]

HEADLINE = (
    ("roc_auc", "ROC AUC"),
    ("average_precision", "Average precision (area under the PR curve)"),
    ("partial_auc_above_80tpr", "Partial AUC above 80% sensitivity (0 to 0.2; ISIC 2024)"),
    ("specificity_at_95_sensitivity", "Specificity at 95% sensitivity (threshold set on this data)"),
    ("accuracy@screening", "Accuracy at the screening threshold"),
    ("balanced_accuracy@screening", "Balanced accuracy at the screening threshold"),
    ("brier", "Brier score (lower is better)"),
    ("ece", "Expected calibration error, 15 bins (lower is better)"),
)
# Under every table that gives ECE a bootstrap interval: readers otherwise take an interval above the value for an error.
ECE_NOTE = ("ECE's interval can lie above its value: ECE adds up absolute gaps, so the noise of each bootstrap "
            "resample (repeated images, fewer distinct ones per bin) counts as miscalibration. Read the interval as "
            "the spread of ECE, not as bounds around it.")
AT_THRESHOLD = (
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("ppv_at_prevalence", "PPV at prevalence"),
    ("npv_at_prevalence", "NPV at prevalence"),
)
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;
padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin-top:1.6rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.disclaimer{background:#fff4e5;border:2px solid #e8a33d;padding:.7rem 1rem;border-radius:6px;font-weight:600}
.note{color:#555;font-size:.88rem}
tr.small td{background:#fff8e6}.flag{color:#a15c00;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85rem;color:#444;max-width:560px}
code{background:#f5f5f5;padding:0 .2rem}
"""


_ROLES = (("train", "{}training split"),
          ("val", "{}validation split (where its epoch, calibration and thresholds were chosen)"),
          ("recalibration", "the images {}calibration and thresholds were re-fitted on (`melanoma recalibrate`)"))


MODELS = "the model's "


def _share(n: int, of: int) -> str:
    f = 100.0 * n / of if of else 0.0
    return "<1%" if 0 < f < 1 else ">99%" if 99 < f < 100 else f"{f:.0f}%"


def overlap_warning(name: str, overlap: Mapping[str, Any] | None) -> str | None:
    """One line for a set some of whose scored images the model trained on, chose its epoch, calibration and
    thresholds on, or was recalibrated on (metrics.json's per-set ``overlap``); None for a set with none."""
    if not overlap:
        return None
    n = int(overlap.get("of") or 0)
    copies = overlap.get("copies") or {}
    # a copy under another name, size or encoding (found by perceptual hash) counts as the image itself
    counts = {k: max(int(overlap.get(k) or 0), int(copies.get(k) or 0)) for k, _ in _ROLES}
    found = [(counts[k], what) for k, what in _ROLES if counts[k]]
    if found:
        (c, what), rest = found[0], found[1:]
        text = f"{c:,} of {n:,} scored images ({_share(c, n)}) are in {what.format(MODELS)}"
        text += "".join(f"{' and' if i == len(rest) - 1 else ','} {c2:,} ({_share(c2, n)}) in {w2.format('its ')}"
                        for i, (c2, w2) in enumerate(rest))
        if any(int(copies.get(k) or 0) > int(overlap.get(k) or 0) for k, _ in _ROLES):
            text += " (counting copies under another name, size or encoding, found by perceptual hash)"
        return f"{name}: {text}; these figures overstate performance on new images"
    if not overlap.get("checked") and overlap.get("in_training_folder"):
        return (f"{name}: its images lie in a data folder the model trained on, and which of them it trained on "
                f"{overlap.get('note') or 'could not be checked'}; these figures may overstate performance on new "
                "images")
    return None


def _overlap_warnings(results: Mapping[str, Any]) -> list[str | None]:
    """The overlap warning of every set, the compared model's ("model B") after the evaluated model's."""
    return ([overlap_warning(s["name"], s.get("overlap")) for s in results["sets"]]
            + [overlap_warning(f"{c['name']} (model B)", c.get("overlap"))
               for c in (results.get("compare") or {}).get("sets", [])])


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def _p(p: Any, *, spaced: bool = False) -> str:
    """A p-value to 4 decimals, and "< 0.0001" rather than a p of 0.0000 (with `spaced`, "= 0.0123" or "< 0.0001")."""
    if p is None:
        return "= n/a" if spaced else "n/a"
    if float(p) < 1e-4:
        return "< 0.0001"
    return f"= {float(p):.4f}" if spaced else f"{float(p):.4f}"


def _ci(m: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``value [low, high]``, or n/a."""
    if not m or m.get("value") is None:
        return "n/a"
    lo, hi = (m.get("ci95") or [None, None])[:2]
    ci = f" [{_num(lo, digits)}, {_num(hi, digits)}]" if lo is not None and hi is not None else " [CI n/a]"
    return f"{_num(m['value'], digits)}{ci}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, num_from: int = 1,
           row_classes: Sequence[str] | None = None, caption: str | None = None,
           text_cols: Sequence[int] = ()) -> str:
    out = ["<table>"]
    if caption:
        out.append(f"<caption class='note'>{_e(caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for i, row in enumerate(rows):
        cls = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        cells = "".join(
            f"<td class='num'>{_e(c)}</td>" if j >= num_from and j not in text_cols
            else f"<td>{_e(c)}</td>"
            for j, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _img(out: Path, plot: Mapping[str, str]) -> str:
    data = base64.b64encode((out / plot["file"]).read_bytes()).decode("ascii")
    title = _e(plot["title"])
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{title}' title='{title}'>"
            f"<figcaption>{title} (<code>{_e(plot['file'])}</code>)</figcaption></figure>")


def _label(key: str, prevalence: float | None = None) -> str:
    """Readable name of a metrics.json key (``sensitivity@screening`` -> ``Sensitivity at the
    screening threshold``)."""
    headline = dict(HEADLINE)
    if key in headline:
        return headline[key]
    name, _, thr = key.partition("@")
    label = dict(AT_THRESHOLD).get(name, name)
    if "prevalence" in name and prevalence is not None:
        label += f" {prevalence:g}"
    return f"{label} at the {thr} threshold" if thr else label


def _model_rows(info: Mapping[str, Any]) -> list[list[Any]]:
    thr = ", ".join(f"{k} = {v:.4g}" for k, v in (info.get("thresholds") or {}).items())
    rows = [
        ["path", info.get("path") or "?"],
        ["kind", info.get("kind")],
        ["version", info.get("version") or "unknown"],
        ["backbone", info.get("backbone") or "unknown"],
        ["temperature (calibration)", _num(info.get("temperature"), 4)],
        ["thresholds", f"{thr} ({info.get('thresholds_note', '')})"],
        ["test-time augmentation", "yes (8 flips/rotations)" if info.get("tta") else "no"],
    ]
    if info.get("created"):
        rows.append(["created", info["created"]])
    if info.get("sha256"):
        rows.append(["graph sha256", info["sha256"]])
    if "training_split" in info:
        rows.append(["training images checked against", info["training_split"] or
                     f"nothing ({info.get('training_split_note') or 'no split found'})"])
    return rows


def _threshold_table(s: Mapping[str, Any], prevalence: float | None) -> str:
    metrics = s["metrics"]
    keys = [(k, label) for k, label in AT_THRESHOLD
            if prevalence is not None or "prevalence" not in k]
    header = ["threshold", "value"] + [
        f"{label} ({prevalence:g})" if "prevalence" in k else label for k, label in keys
    ] + ["TP", "FN", "TN", "FP"]
    rows = []
    for name, thr in s["thresholds"].items():
        cm = s["confusion"][name]
        rows.append([name, f"{thr:.4g}"] + [_ci(metrics.get(f"{k}@{name}")) for k, _ in keys]
                    + [cm["tp"], cm["fn"], cm["tn"], cm["fp"]])
    return _table(header, rows)


def _subgroup_html(subgroups: Mapping[str, Sequence[Mapping[str, Any]]], small: int) -> str:
    if not subgroups:
        return ("<p class='note'>No subgroup metadata (sex, age, localization, dx) in this data; "
                "a CSV manifest with those columns enables this section.</p>")
    parts = [f"<p class='note'>Sensitivity and specificity at the screening threshold; AUC only "
             f"where a subgroup holds both classes. Subgroups with fewer than {small} assessed "
             f"cases are <span class='flag'>flagged</span>, not hidden: their intervals are wide. "
             f"For <code>dx</code>, most diagnoses are one class (mel is all malignant, nv all "
             f"benign), so the table gives sensitivity for malignant diagnoses and specificity for "
             f"benign ones, with the AUC of every melanoma in the set against that diagnosis "
             f"(melanoma vs. nevus, vs. keratosis, ...).</p>"]
    for attr, rows in subgroups.items():
        parts.append(f"<h4>{_e(attr)}</h4>")
        body, classes = [], []
        for r in rows:
            flag = f"⚠ n<{small}" if r["small"] else ""
            body.append([r["value"], r["n"], r["n_malignant"], r["n_benign"], r["n_cannot_assess"],
                         _ci(r["roc_auc"]) if r.get("roc_auc_vs_malignant") is None
                         else _ci(r["roc_auc_vs_malignant"]) + " vs all melanomas",
                         _ci(r["sensitivity"]), _ci(r["specificity"]),
                         " ".join(x for x in (flag, r.get("note", "")) if x)])
            classes.append("small" if r["small"] else "")
        parts.append(_table([attr, "n", "malignant", "benign", "cannot assess", "AUC [95% CI]",
                             "sensitivity [95% CI]", "specificity [95% CI]", "note"],
                            body, row_classes=classes, text_cols=(8,)))
    return "\n".join(parts)


def _cannot_assess_html(s: Mapping[str, Any]) -> str:
    n = s["n_cannot_assess"]
    if not n:
        return "<p>Every image passed the input gate.</p>"
    items = s["cannot_assess"][:500]
    more = n - len(items)
    return (f"<details><summary>{n} image(s) the input gate refused "
            f"({s.get('n_cannot_assess_malignant', 0)} malignant): listed, not scored</summary>"
            + _table(["path", "label", "reason"], [[c["path"], c["label"], c["reason"]] for c in items],
                     num_from=99)
            + (f"<p class='note'>... and {more} more: see cannot_assess.csv</p>" if more > 0 else "")
            + "</details>")


def _compare_html(c: Mapping[str, Any] | None, out: Path, info_a, info_b, prevalence) -> str:
    if not c:
        return ""
    parts = [f"<h3>Comparison with model B</h3><p class='note'>A = {_e(info_a.get('path'))}, "
             f"B = {_e(info_b.get('path'))}. {_e(c.get('note', '').capitalize())}. Images both models could "
             f"assess: {c['n_common']} ({c['n_malignant']} malignant); refused by A: "
             f"{c['n_cannot_assess_model']}, by B: {c['n_cannot_assess_compare']}.</p>"]
    if not c.get("model"):
        return "\n".join(parts)
    d = c["delong"] or {}
    clustered = d.get("n_groups") is not None
    parts.append("<h4>DeLong's test (AUC difference)" + (", clustered by lesion group (Obuchowski)" if clustered
                                                           else "") + "</h4>")
    parts.append(_table(
        ["AUC A", "AUC B", "difference A − B [95% CI]", "z", "p-value (two-sided)", "n"],
        [[_num(d.get("auc1")), _num(d.get("auc2")),
          f"{_num(d.get('diff'))} [{_num(d.get('ci_low'))}, {_num(d.get('ci_high'))}]",
          _num(d.get("z"), 2), _p(d.get("p_value")),
          f"{c['n_common']} ({d['n_groups']} groups)" if clustered else c["n_common"]]], num_from=0))
    keys = [k for k in c["model"] if k in c["compare"]]
    keys += [k for k in c["model"] if k not in c["compare"]]
    keys += [k for k in c["compare"] if k not in c["model"]]
    rows = [[_label(k, prevalence), _ci(c["model"].get(k)), _ci(c["compare"].get(k))] for k in keys]
    parts.append("<h4>Side by side (same images, paired bootstrap)</h4>")
    parts.append(_table(["metric", "A [95% CI]", "B [95% CI]"], rows))
    parts.append("<div class='figs'>" + "".join(_img(out, pl) for pl in c["plots"].values()) + "</div>")
    return "\n".join(parts)


def render_html(results: Mapping[str, Any], out: Path) -> str:
    """The report page for ``results`` (metrics.json content); plot files are read from ``out``."""
    out = Path(out)
    settings = results["settings"]
    prevalence = settings.get("prevalence")
    info = results["model"]
    cmp = results.get("compare")
    disclaimer = results.get("disclaimer") or DISCLAIMER
    small = settings.get("small_subgroup", 30)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Evaluation report: {_e(info.get('version') or info.get('path'))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Melanoma detector: evaluation report</h1>",
        f"<p class='disclaimer'>{_e(disclaimer)}</p>",
        f"<p class='note'>{_e(results.get('software'))}, generated {_e(results.get('created'))}.</p>",
        "<h2>Model</h2>", _table(["", "model A" if cmp else "model"], _model_rows(info), num_from=99),
    ]
    if cmp:
        parts += ["<h3>Model B (compared)</h3>",
                  _table(["", "model B"], _model_rows(cmp["model"]), num_from=99)]
    parts += [
        "<h2>Method</h2>",
        f"<p>95% confidence intervals: percentile bootstrap with {settings['n_resamples']} "
        f"resamples (seed {settings['seed']}); where the data names lesion groups, whole lesions "
        f"are resampled so that several images of one lesion do not count as independent "
        f"evidence. A proportion at a threshold (sensitivity, specificity, PPV, NPV, accuracy) gets "
        f"the union of that interval and Wilson's score interval (counting lesion groups where named), "
        f"because the percentile bootstrap shrinks to a point at 0% or 100%. Point estimates are on all assessed images. A case is called malignant when "
        f"its probability is at or above the threshold. The <em>screening</em> threshold was set "
        f"for 95% sensitivity and the <em>high_specificity</em> threshold for 90% specificity on "
        f"the model's validation data; on a new set they give whatever sensitivity and "
        f"specificity the tables show. Images the input gate refuses (not a dermoscopic image, "
        f"too small, blank, ...) are counted and listed, not scored."
        + (f" PPV and NPV are also re-weighted to a melanoma prevalence of {prevalence:g} "
           f"(Bayes' rule from sensitivity and specificity), since a curated test set's "
           f"prevalence is rarely a clinic's." if prevalence is not None else "")
        + "</p>",
        "<h2>Summary</h2>",
    ]
    rows = []
    for s in results["sets"]:
        m = s["metrics"]
        rows.append([s["name"], s["data"], s["n_listed"], s["n"], s["n_malignant"], s["n_benign"],
                     s["n_cannot_assess"], s["n_groups"] if s["grouped_bootstrap"] else "not named",
                     _ci(m.get("roc_auc")), _ci(m.get("sensitivity@screening")),
                     _ci(m.get("specificity@screening"))])
    parts.append(_table(["set", "data", "images", "assessed", "malignant", "benign",
                         "cannot assess", "lesion groups", "AUC [95% CI]",
                         "sensitivity @ screening", "specificity @ screening"], rows, num_from=2))
    parts += [f"<p class='flag'>Warning: {_e(w)}.</p>" for w in _overlap_warnings(results) if w]

    cmp_sets = {c["name"]: c for c in (cmp or {}).get("sets", [])}
    for s in results["sets"]:
        m = s["metrics"]
        parts.append(f"<h2 id='set-{_e(s['name'])}'>Test set: {_e(s['name'])}</h2>")
        warning = overlap_warning(s["name"], s.get("overlap"))
        if warning:
            parts.append(f"<p class='flag'>Warning: {_e(warning)}.</p>")
        parts.append(
            f"<p>Data: <code>{_e(s['data'])}</code>"
            + (f" (split: {_e(s['split'])})" if s.get("split") else "")
            + (". A bundle's calibration and thresholds are fitted on a val split: if it is this one, the "
               "figures at its thresholds are optimistic" if s.get("split") == "val" else "")
            + f". Images: {s['n_listed']}; assessed: {s['n']} ({s['n_malignant']} malignant, "
              f"{s['n_benign']} benign); cannot assess: {s['n_cannot_assess']}. "
            + (f"Bootstrap resampled by lesion group ({s['n_groups']} groups)."
               if s["grouped_bootstrap"] else "No lesion groups in the data: images resampled.")
            + "</p>")
        parts.append("<h3>Discrimination and calibration</h3>")
        parts.append(_table(["metric", "value [95% CI]"],
                            [[label, _ci(m.get(k))] for k, label in HEADLINE]))
        parts.append(f"<p class='note'>{_e(ECE_NOTE)}</p>")
        parts.append("<h3>At each stored threshold</h3>")
        parts.append(_threshold_table(s, prevalence))
        cal = s["calibration"]
        parts.append("<h3>Calibration</h3>")
        parts.append(_table(["", "before (T = 1, b = 0)",
                             f"after (T = {_num(cal['temperature'], 3)}, b = {_num(cal.get('logit_bias', 0.0), 3)})"],
                            [["ECE (15 bins)", _num(cal["ece_before"]), _num(cal["ece_after"])],
                             ["Brier score", _num(cal["brier_before"]), _num(cal["brier_after"])]]))
        parts.append(f"<p class='note'>{_e(cal['note'])}</p>")
        parts.append("<h3>Plots</h3><div class='figs'>")
        parts += [_img(out, pl) for pl in s["plots"].values()]
        parts.append("</div>")
        if cmp:
            parts.append(_compare_html(cmp_sets.get(s["name"]), out, info, cmp["model"], prevalence))
        parts.append("<h3>Subgroups</h3>")
        parts.append(_subgroup_html(s.get("subgroups") or {}, small))
        parts.append("<h3>Images that cannot be assessed</h3>")
        parts.append(_cannot_assess_html(s))
    parts += [f"<hr><p class='disclaimer'>{_e(disclaimer)}</p>", "</body></html>"]
    return "\n".join(parts)


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    out = Path(out)
    path = out / "report.html"
    path.write_text(render_html(results, out), encoding="utf-8")
    return path


def format_summary(results: Mapping[str, Any]) -> str:
    """A compact table for the terminal: per set n, AUC [CI], sensitivity/specificity at the
    screening threshold (and the second model with DeLong's p when comparing)."""
    thr = results["model"]["thresholds"]["screening"]
    header = (f"{'set':<18} {'n':>6} {'malig':>6} {'refused':>7}  {'AUC [95% CI]':<22} "
              f"{'sens @ screening':<22} {'spec @ screening':<22}")
    note = results["model"].get("thresholds_note") or ""
    # a default threshold (an interrupted run's checkpoint stores none) must not pass for a fitted one
    unfitted = f" ({note}: not fitted on validation images)" if note.startswith("the model stores no") else ""
    lines = [f"screening threshold {thr:.4g}{unfitted}; 95% CIs from {results['settings']['n_resamples']} "
             f"bootstrap resamples", header, "-" * len(header)]
    cmp = {c["name"]: c for c in (results.get("compare") or {}).get("sets", [])}
    for s in results["sets"]:
        m = s["metrics"]
        lines.append(f"{s['name'][:18]:<18} {s['n']:>6} {s['n_malignant']:>6} {s['n_cannot_assess']:>7}  "
                     f"{_ci(m.get('roc_auc')):<22} {_ci(m.get('sensitivity@screening')):<22} "
                     f"{_ci(m.get('specificity@screening')):<22}")
        c = cmp.get(s["name"])
        if c and c.get("compare"):
            # DeLong pairs the two models on the images both assessed: show both there, not A on all of its own
            d = c["delong"] or {}
            for label, mb, refused in (("  A (same imgs)", c["model"] or {}, s["n_cannot_assess"]),
                                       ("  B (same imgs)", c["compare"], c["n_cannot_assess_compare"])):
                lines.append(f"{label:<18} {c['n_common']:>6} {c['n_malignant']:>6} {refused:>7}  "
                             f"{_ci(mb.get('roc_auc')):<22} {_ci(mb.get('sensitivity@screening')):<22} "
                             f"{_ci(mb.get('specificity@screening')):<22}")
            lines.append(f"{'':<18} DeLong: AUC A − B = {_num(d.get('diff'))} "
                         f"[{_num(d.get('ci_low'))}, {_num(d.get('ci_high'))}], "
                         f"p {_p(d.get('p_value'), spaced=True)}"
                         + (f" (clustered by {d['n_groups']} lesion groups)" if d.get("n_groups") is not None else ""))
    lines += [f"warning: {w}" for w in _overlap_warnings(results) if w]
    return "\n".join(lines)
