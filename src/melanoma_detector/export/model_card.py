"""MODEL_CARD.md, written from the bundle's metadata.json (never by hand, so it cannot drift)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melanoma_detector.evaluation.report import ECE_NOTE

ROWS = [
    ("ROC AUC", "roc_auc"),
    ("Average precision", "average_precision"),
    ("Partial AUC above 80% TPR (max 0.2)", "partial_auc_above_80tpr"),
    ("Specificity at 95% sensitivity", "specificity_at_95_sensitivity"),
    ("Sensitivity @ screening threshold", "sensitivity@screening"),
    ("Specificity @ screening threshold", "specificity@screening"),
    ("Sensitivity @ high-specificity threshold", "sensitivity@high_specificity"),
    ("Specificity @ high-specificity threshold", "specificity@high_specificity"),
    ("Balanced accuracy @ screening", "balanced_accuracy@screening"),
    ("Brier score", "brier"),
    ("ECE (15 bins)", "ece"),
]


def _cell(m: dict[str, Any] | None, *, ci: bool = True) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    lo, hi = (m.get("ci95") or [None, None])[:2] if ci else (None, None)
    interval = f" ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{m['value']:.3f}{interval}"


def metrics_table(metrics: dict[str, Any], names: dict[str, str] | None = None) -> str:
    sets = [s for s in ("test", "val") if s in metrics]  # other keys (n_resamples) are not sets
    if not sets:
        return "_No data-derived metrics in this bundle (exported without its split's images)._\n"
    names = names or {"test": "Test split", "val": "Validation split"}
    head = "| Metric | " + " | ".join(f"{names[s]} (n={metrics[s]['n']}, {metrics[s]['n_malignant']} melanoma)" for s in sets) + " |"
    lines = [head, "|---" * (len(sets) + 1) + "|"]
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(metrics[s].get(key)) for s in sets) + " |")
    return "\n".join(lines) + "\n"


def external_table(meta: dict[str, Any]) -> str:
    """The model card's external-validation section body."""
    entries = meta.get("external_validation") or []
    if not entries:
        return ("_None recorded: every figure above comes from the collections the model trained on. Record one with "
                "`melanoma card BUNDLE --external-eval EVAL_DIR` after `melanoma evaluate` on images it never saw._\n")
    lines = [("| Data (never seen by the evaluated model) | Images scored (melanoma) | Model evaluated | ROC AUC | "
             "Sensitivity / specificity @ its screening threshold | Specificity @ 95% sensitivity | ECE |"),
             "|---|---|---|---|---|---|---|"]
    notes: list[str] = []  # one footnote per distinct proxy (model and note), however many sets it scored
    for e in entries:
        m = e["metrics"]
        if e["same_model"]:
            who = "this bundle"
        else:
            em = e["evaluated_model"]
            own = f", its own validation AUC {em['best_val_auc']:.3f}" if em.get("best_val_auc") is not None else ""
            note = f"{e['note']}; evaluated: `{em.get('path')}`{own}"
            if note not in notes:
                notes.append(note)
            who = f"proxy [{notes.index(note) + 1}]: `{e['evaluated_model'].get('backbone')}` trained on " + (
                ", ".join("/".join(Path(p).parts[-2:]) for p in e["trained_on"]) if e.get("trained_on") else "(not recorded)")
        where = "/".join(Path(e["data"]).parts[-2:]) + (f" ({e['split']} split)" if e.get("split") not in (None, "all") else "")
        refused = f"; {e['n_cannot_assess']} refused by the input gate" if e.get("n_cannot_assess") else ""
        lines.append(f"| {where} | {e['n']} ({e['n_malignant']}){refused} | {who}{' + TTA' if e.get('tta') else ''} | "
                     f"{_cell(m.get('roc_auc'))} | {_cell(m.get('sensitivity@screening'), ci=False)} / "
                     f"{_cell(m.get('specificity@screening'), ci=False)} | {_cell(m.get('specificity_at_95_sensitivity'), ci=False)} | "
                     f"{_cell(m.get('ece'), ci=False)} |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += ("\nProxy rows score another model than this bundle, on data this bundle may have trained on; they "
                 "estimate how the recipe carries to a new collection:\n"
                 + "\n".join(f"- [{i}] {n}" for i, n in enumerate(notes, 1)) + "\n")
    return text


def recalibration_text(recal: dict[str, Any], after: dict[str, Any] | None) -> str:
    """Before/after on the held-out images: what re-fitting calibration and thresholds bought."""
    src = recal["source_bundle"]
    head = (f"\nRe-fitted from bundle `{src['model_version']}` (same graph; its own calibration: T = "
            f"{src['temperature']:.3f}, b = {src['logit_bias']:.3f}, screening threshold {src['thresholds']['screening']:.4f}) "
            f"on {recal['n_fit']} images ({recal['n_fit_malignant']} melanoma)")
    src_refused = recal.get("source_gate_refused_fraction")
    if recal.get("gate") == "refit":
        held = recal.get("holdout_refused_fraction")
        head += (f". The input gate was re-fitted on the fitting images too (the source bundle's gate refused "
                 f"{src_refused:.0%} of these images{f'; the new one refuses {held:.0%} of the held-out ones' if held is not None else ''})")
    elif src_refused:
        head += f". The source bundle's input gate was kept; it refused {src_refused:.0%} of these images, left out"
    before = recal.get("holdout_before")
    if not before:
        return head + "; nothing was held out, so no figure measures the result.\n"
    rows = [("Sensitivity @ screening threshold", "sensitivity@screening"),
            ("Specificity @ screening threshold", "specificity@screening"),
            ("Sensitivity @ high-specificity threshold", "sensitivity@high_specificity"),
            ("Specificity @ high-specificity threshold", "specificity@high_specificity"),
            ("ECE (15 bins)", "ece"), ("ROC AUC (unchanged by calibration)", "roc_auc")]
    lines = [head + f"; {recal['n_holdout']} images ({recal['n_holdout_malignant']} melanoma), whole lesion groups, "
             "were held out to measure it:", "",
             "| Held-out images | Source bundle's calibration | Re-fitted |", "|---|---|---|"]
    for label, key in rows:
        lines.append(f"| {label} | {_cell(before.get(key))} | {_cell((after or {}).get(key))} |")
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: str | Path, meta: dict[str, Any]) -> Path:
    pp = meta["preprocessing"]
    th = meta["thresholds"]
    data = "\n".join(f"- **{d['name']}**: " + " ".join(x for x in (d.get("citation"), "Licence: "
                                                                     f"{d.get('licence', 'see source')}.") if x)
                     for d in meta["training"]["data"])
    facts = _data_facts(meta)
    members = meta["training"].get("members")
    if members:  # an ensemble: one recipe line per member, in export order
        recipe = "- Mean logit of separately trained models:\n" + "\n".join(
            f"  - `{m['backbone']}`: " + _recipe(m["config"], m.get("best"), indent="    ") for m in members)
    else:
        recipe = "- Training recipe: " + _recipe(meta["training"]["config"], meta["training"].get("best"), indent="  ")
    colour = ("; Shades-of-Grey colour constancy (p = 6) on each cropped image before standardising"
              if pp.get("color_constancy", "none") == "shades_of_gray" else "")
    gate = meta.get("input_gate", {})
    ood = gate.get("ood")
    test = meta.get("metrics", {}).get("test", {})
    refused = test.get("ood_refused_fraction")
    recal = meta.get("recalibration")
    fitted_on = (f"{recal['n_fit']} images of {', '.join(recal['data'])} by `melanoma recalibrate`" if recal
                 else "the validation split")
    recal_text = recalibration_text(recal, (meta.get("metrics") or {}).get("test")) if recal else ""
    text = f"""# Model card: melanoma-detector `{meta['model_version']}`

> **{meta['disclaimer']}**

## Intended use
Research on benign vs. malignant (melanoma) classification of **dermoscopic** images: method
development, benchmarking, teaching. It is **not** a medical device and **never a diagnosis**; it
must not be used to decide whether a person seeks care. Out of scope: clinical (non-dermoscopic)
photos, non-skin images, mucosal/acral/nail lesions beyond what the training data holds, children.

## Model
- Backbone: `{meta['backbone']}` ({_init_text(meta)}) + {_head_text(meta)}.
- Input: {pp['input_size']}x{pp['input_size']} RGB, resize mode `{pp['resize_mode']}`, crop_pct {pp['crop_pct']},
  {pp['interpolation']} interpolation, mean {pp['mean']}, std {pp['std']}{colour}.
{recipe}
- Graph: ONNX opset {meta['graph']['opset']}, {meta['graph']['precision']}, sha256 `{meta['graph']['sha256']}`.

## Training data and licence
{data}

Split: {_grouping_text(meta)}, stratified, seeded; {facts['split']}. **{meta['licence']}.** {facts['inherits']}
{_seen_images_text(meta)}
## Calibration and operating points (set on {fitted_on})
- Temperature scaling with a bias: p = sigmoid(logit / T + b), T = {meta['temperature']:.3f},
  b = {meta.get('logit_bias', 0.0):.3f} (the bias undoes the prior shift of class-weighted training).
- Screening threshold (>= 95% sensitivity there): p >= {th['screening']:.4f}.
- High-specificity threshold (>= 90% specificity there): p >= {th['high_specificity']:.4f}.
- Risk levels: **Low** below the screening threshold, **Moderate** between the two, **High** above
  the high-specificity threshold.
{recal_text}
## Metrics (95% bootstrap CIs, {(meta.get('metrics') or {}).get('n_resamples', 1000)} resamples by lesion group{_proportions_text(meta)})
{metrics_table(meta.get('metrics', {}), {"test": "Held-out recalibration images"} if recal else None)}
{ECE_NOTE}

## External validation
{external_table(meta)}
## Input gate
Refused as `cannot_assess` with a reason: files that do not decode, images under {gate.get('min_side', 64)} px on a
side, near-uniform images (grey-level std < {gate.get('min_std', 4.0)}),{' and images whose gate features are far from those of ' + _gate_images(meta) + ' (' + ood['method'] + '; threshold ' + f"{ood['threshold']:.2f}" + ', ' + ood['threshold_rule'] + ')' if ood else ' (no out-of-distribution statistics in this bundle)'}.{f' On the test split it refuses {refused:.1%} of dermoscopic images.' if refused is not None else ''}

## Limitations
- Dermoscopic images only; clinical photos, screenshots and non-skin images are out of distribution.
{facts['resolution']}{facts['skin']}
- Validation and test come from the same collections as training; expect lower performance on other
  dermatoscopes, clinics and populations ({_external_summary(meta)}).
  Calibration and thresholds drift with the source and with prevalence: check them on labelled images from
  your own source before relying on them.
- Melanoma vs. everything else: basal cell carcinoma and other malignancies count as "benign" here.
"""
    path = Path(out_dir) / "MODEL_CARD.md"
    path.write_text(text)
    return path


HAM, ISIC = "HAM10000", "ISIC 2017"


def _proportions_text(meta: dict[str, Any]) -> str:
    """How the intervals of proportions were made, for bundles that record it (earlier ones: bootstrap alone)."""
    if (meta.get("metrics") or {}).get("proportion_intervals") == "wilson-union":
        return "; a proportion's interval also covers Wilson's, on lesion groups"
    return ""


def _seen_images_text(meta: dict[str, Any]) -> str:
    """What lets `melanoma evaluate` find copies of the images this model saw (empty when the bundle has none)."""
    seen = meta.get("seen_images")
    if not seen:
        return ""
    counts = seen.get("counts") or {}
    return (f"\nFingerprints: `{seen['file']}` holds perceptual hashes of the {counts.get('train', 0):,} training and "
            f"{counts.get('val', 0):,} validation images ({seen['method']}), so that `melanoma evaluate` counts "
            "renamed, resized or re-encoded copies of them among the images it scores; a crop is not found.\n")
SEED_HEAD = ([512, 256], [0.45, 0.35])


def _configs(meta: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(backbone, training config) of every member (one for a single model)."""
    training = meta["training"]
    members = training.get("members")
    if members:
        return [(m.get("backbone", "?"), m.get("config") or {}) for m in members]
    return [(meta.get("backbone", "?"), training.get("config") or {})]


def _per_member(texts: list[tuple[str, str]]) -> str:
    distinct = list(dict.fromkeys(t for _, t in texts))
    return distinct[0] if len(distinct) == 1 else "; ".join(f"`{b}`: {t}" for b, t in texts)


def _init_text(meta: dict[str, Any]) -> str:
    """How the backbone was initialised, as each training config says."""
    def one(cfg: dict[str, Any]) -> str:
        m = cfg.get("model") or {}
        if m.get("weights"):
            return f"pretrained weights from `{Path(str(m['weights'])).name}`, timm"
        if "pretrained" not in m:
            return "initialisation not recorded, timm"
        if not m["pretrained"]:
            return "randomly initialised, no pretrained weights, timm"
        if m.get("allow_random_init"):
            return "ImageNet-pretrained weights asked for, random initialisation allowed where none loaded, timm"
        return "ImageNet-pretrained, timm"
    return _per_member([(b, one(c)) for b, c in _configs(meta)])


def _head_text(meta: dict[str, Any]) -> str:
    def one(cfg: dict[str, Any]) -> str:
        m = cfg.get("model") or {}
        hidden, dropout = m.get("hidden", SEED_HEAD[0]), m.get("dropout", SEED_HEAD[1])
        who = "the seed notebook's head" if (list(hidden), list(dropout)) == SEED_HEAD else "a head"
        layers = " -> ".join(f"Dense {h} ReLU -> Dropout {d}" for h, d in zip(hidden, dropout))
        return f"{who}\n  (GAP -> BatchNorm -> {layers} -> Dense 1)"
    return _per_member([(b, one(c)) for b, c in _configs(meta)])


def _gate_images(meta: dict[str, Any]) -> str:
    """The images the input gate's out-of-distribution threshold was fitted on."""
    gate = meta.get("input_gate") or {}
    refitted = gate.get("refitted") or {}
    recal = meta.get("recalibration") or {}
    if refitted.get("by") == "melanoma recalibrate" or recal.get("gate") == "refit":
        data = refitted.get("data") or recal.get("data") or []
        return "the recalibration images" + (f" of {', '.join(str(d) for d in data)}" if data else "")
    return "the validation images"


def _grouping_text(meta: dict[str, Any]) -> str:
    """Lesion-grouped only where the data named lesions: with one group per image, the split was by image."""
    m = (meta.get("metrics") or {}).get("test") or (meta.get("metrics") or {}).get("val") or {}
    if isinstance(m.get("n_groups"), int) and isinstance(m.get("n"), int) and m["n_groups"] >= m["n"]:
        return "by image (the data names no lesion groups, so images of one lesion may sit on two sides)"
    return "lesion-grouped (no lesion on two sides)"


def _data_facts(meta: dict[str, Any]) -> dict[str, str]:
    """The card's statements about the training data, for the collections the bundle credits: what holds for
    HAM10000 and ISIC 2017 (their layout, resolution, licence) is said of them only."""
    names = [str(d.get("name", "")) for d in meta["training"].get("data") or []]
    ham = HAM in names
    isic = any(n.startswith(ISIC) for n in names)
    others = [n for n in names if n != HAM and not n.startswith(ISIC)]
    data_cfg = (meta["training"].get("config") or {}).get("data") or {}
    v, t = data_cfg.get("val_fraction"), data_cfg.get("test_fraction")
    fractions = (f"{round(100 * (1 - v - t))}/{round(100 * v)}/{round(100 * t)} train/val/test"
                 if isinstance(v, (int, float)) and isinstance(t, (int, float)) else "train/val/test (fractions not recorded)")
    split = [f"{HAM} {fractions}"] if ham else []
    if isic:
        split.append(f"{ISIC} train -> train, {ISIC} val -> val")
    if others:
        # a collection's own train/val/test folders are kept, so the configured fractions may not be what happened
        counts = meta.get("splits") or {}
        actual = (f"; {counts['val']:,} validation and {counts['test']:,} test images" if not ham and not isic
                  and isinstance(counts.get("val"), int) and isinstance(counts.get("test"), int) else "")
        split.append(f"{', '.join(others)} {fractions} where it has no split folders (its own train/val/test folders "
                     f"are kept){actual}")
    inherits = ("Anything derived from this\nmodel inherits the non-commercial terms of HAM10000." if ham else
                "Anything derived from this model inherits the terms of the data it was trained on.")
    shrunk = ([f"{HAM} was shrunk to 200x150"] if ham else []) + ([f"{ISIC} squashed to 256x256"] if isic else [])
    if not shrunk:
        resolution = ""
    elif others:
        resolution = (f"- {' and '.join(shrunk)} for this training run (the other data's resolution is not recorded): "
                      "fine structures\n  may be under-used.\n")
    else:
        resolution = (f"- {' and '.join(shrunk)} for this training run: the model has\n"
                      "  never seen full-resolution dermoscopy, and fine structures may be under-used.\n")
    known = [x for x, here in ((HAM, ham), (ISIC, isic)) if here]
    if not known:
        skin = "- The training data's mix of skin types is not recorded; performance on darker skin (V-VI) is unknown."
    else:
        where = "both data sets" if len(known) == 2 else known[0]
        rest = "; the other training data's mix is not recorded" if others else ""
        skin = f"- Skin types V-VI are under-represented in {where}{rest}; performance on darker skin is unknown."
    return {"split": ",\n".join(split) or "no training data recorded", "inherits": inherits,
            "resolution": resolution, "skin": skin}


def _external_summary(meta: dict[str, Any]) -> str:
    entries = [e for e in meta.get("external_validation") or [] if (e["metrics"].get("roc_auc") or {}).get("value")]
    if not entries:
        return "no external validation is recorded in this bundle"
    parts = []
    for own, who in ((True, "this bundle"), (False, "proxy models")):
        aucs = [e["metrics"]["roc_auc"]["value"] for e in entries if bool(e["same_model"]) == own]
        if aucs:
            lo, hi = f"{min(aucs):.2f}", f"{max(aucs):.2f}"
            span = lo if lo == hi else f"{lo}-{hi}"
            parts.append(f"AUC {span} for {who}")
    return "see External validation: " + "; ".join(parts) + " on collections they never saw"


def _recipe(cfg: dict, best: dict | None, *, indent: str) -> str:
    t = cfg["train"]
    return (f"phase 1 {t['epochs_frozen']} epochs on a frozen backbone (Adam {t['lr_frozen']}),\n"
            f"{indent}phase 2 up to {t['epochs_finetune']} epochs with the top {t['unfreeze_fraction']:.0%} of the backbone unfrozen\n"
            f"{indent}(Adam {t['lr_finetune']}, mode `{t['phase2_mode']}`), class-weighted BCE, best epoch by validation AUC"
            f"{_best_text(best)}.")


def _best_text(best: dict | None) -> str:
    best = best or {}
    if "epoch" not in best or "val_auc" not in best:
        return ""
    where = " ".join(str(x) for x in (best.get("phase"), "epoch", best["epoch"]) if x)
    return f" (kept: {where}, validation AUC {float(best['val_auc']):.3f})"
