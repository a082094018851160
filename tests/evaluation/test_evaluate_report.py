"""`melanoma evaluate`: the HTML report, metrics.json with CIs, several sets, --compare with
DeLong's test, subgroups from manifest metadata, and the CLI's error cases.

Most tests use stand-in predictors (fast, deterministic); one end-to-end test trains a tiny
model, exports it, and evaluates the bundle against its checkpoint through the CLI.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_BACKBONE, lesion_image, make_class_folder
from melanoma_detector import DISCLAIMER
from melanoma_detector.cli import main
from melanoma_detector.evaluation import bootstrap as B
from melanoma_detector.evaluation import metrics as M
from melanoma_detector.evaluation.evaluate import evaluate_model, load_eval_sets
from melanoma_detector.evaluation.subgroups import age_band

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESAMPLES = 200


# ------------------------------------------------------------------ stand-in models and data


def _u(path: str, salt: str) -> float:
    """A stable pseudo-random number in [0, 1) from a file name."""
    return int(hashlib.sha256((salt + Path(path).name).encode()).hexdigest()[:8], 16) / 16**8


class FakeBundlePredictor:
    """Scores from the class folder in the path plus name-derived noise; refuses 'flat' files.
    Has what the bundle Predictor has: thresholds, threshold, temperature, bundle.metadata."""

    def __init__(self, salt="a", thresholds=None):
        self.salt = salt
        self.thresholds = thresholds or {"screening": 0.35, "high_specificity": 0.7}
        self.threshold = self.thresholds["screening"]
        self.temperature = 1.7
        self.bundle = types.SimpleNamespace(
            root=Path("fake-bundle"),
            metadata={"model_version": "fake-1.0", "backbone": "fakenet_b0", "created": "2025-01-01",
                      "graph": {"sha256": "0" * 64}})

    def _p(self, path: str) -> float:
        malignant = "malignant" in Path(path).parts
        return float(np.clip(0.4 * malignant + 0.6 * _u(path, self.salt), 0.001, 0.999))

    def predict_paths(self, paths, progress=False):
        out = []
        for path in paths:
            if "flat" in Path(path).name:
                out.append({"path": path, "probability_malignant": None, "predicted_label": None,
                            "status": "cannot_assess", "reason": "image is nearly uniform"})
            else:
                p = self._p(path)
                out.append({"path": path, "probability_malignant": p, "status": "ok", "reason": "",
                            "predicted_label": "malignant" if p >= self.threshold else "benign"})
        return out


class FakeCheckpointPredictor(FakeBundlePredictor):
    """Like TorchPredictor: no gate, thresholds from ckpt['thresholds']."""

    def __init__(self):
        super().__init__(salt="b")
        del self.thresholds
        self.ckpt = {"backbone": "fakenet_b1", "thresholds": {"screening": 0.3}, "package_version": "0.1.0"}
        self.threshold = 0.3
        self.temperature = 1.0
        del self.bundle

    def predict_paths(self, paths, progress=False):
        return [{"path": p, "probability_malignant": self._p(p), "status": "ok", "reason": "",
                 "predicted_label": "malignant" if self._p(p) >= self.threshold else "benign"} for p in paths]


def _make_manifest(root: Path) -> Path:
    """A HAM10000-like folder: class folders + labels.csv with lesion_id, sex, age,
    localization, dx; 'face' and age <30 are small subgroups; one flat image the gate refuses."""
    rng = np.random.default_rng(7)
    rows = []
    for lesion in range(44):
        malignant = lesion % 3 == 0
        cls = "malignant" if malignant else "benign"
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(1 + (lesion % 4 == 1)):
            image_id = f"ISIC_{lesion:04d}{k}"
            lesion_image(rng, malignant, size=(64, 64)).save(root / cls / f"{image_id}.jpg")
            rows.append({
                "image_id": image_id, "lesion_id": f"HAM_{lesion:04d}", "label": cls,
                "dx": "mel" if malignant else ("nv" if lesion % 2 else "bkl"),
                "sex": "male" if lesion % 2 else "female",
                "age": "" if lesion == 5 else str(25 + (lesion * 7) % 60),
                "localization": "face" if lesion % 11 == 0 else "back",
            })
    Image.new("RGB", (80, 80), (128, 128, 128)).save(root / "benign" / "flat_0001.jpg")
    rows.append({"image_id": "flat_0001", "lesion_id": "HAM_0999", "label": "benign", "dx": "nv",
                 "sex": "female", "age": "40", "localization": "back"})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaldata")
    ham = _make_manifest(base / "ham")
    kaggle = base / "kaggle"
    make_class_folder(kaggle / "test", 8, np.random.default_rng(3), "te")
    make_class_folder(kaggle / "train", 2, np.random.default_rng(4), "tr")  # must be ignored
    return ham, kaggle


@pytest.fixture(scope="module")
def report(datasets, tmp_path_factory):
    ham, kaggle = datasets
    out = tmp_path_factory.mktemp("report") / "eval"
    results = evaluate_model(FakeBundlePredictor(), [str(ham / "labels.csv"), str(kaggle)], out_dir=out,
                             progress=False, compare=FakeCheckpointPredictor(), prevalence=0.05,
                             n_resamples=RESAMPLES, seed=1, model_source="fake-bundle",
                             compare_source="fake.pt")
    return out, results


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Images:
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


# ------------------------------------------------------------------ bootstrap engine


def test_fast_bootstrap_equals_bootstrap_ci_per_metric():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.25).astype(int)
    p = np.round(1 / (1 + np.exp(-(rng.normal(size=n) * 1.3 + 2 * y - 1.2))), 2)  # with ties
    groups = rng.integers(0, 180, n)
    th = {"screening": M.threshold_for_sensitivity(y, p, 0.95), "high_specificity": 0.7}
    fns = B.metric_functions(th, prevalence=0.03)
    ones = B.weighted_metrics(y, p, np.ones((1, n)), th, prevalence=0.03)
    for name, fn in fns.items():  # a row of ones is the data itself
        assert ones[name][0] == pytest.approx(fn(y, p), abs=1e-12), name
    fast = B.metrics_with_ci(y, p, th, groups=groups, n_resamples=150, seed=5, prevalence=0.03,
                             proportion_intervals="bootstrap")
    assert len(fast) == 22
    for name in ("roc_auc", "average_precision", "partial_auc_above_80tpr", "specificity_at_95_sensitivity",
                 "ece", "brier", "ppv@screening", "balanced_accuracy@high_specificity",
                 "npv_at_prevalence@screening"):
        ci = M.bootstrap_ci(y, p, fns[name], n_resamples=150, seed=5, groups=groups)
        assert fast[name]["ci95"] == pytest.approx([ci.low, ci.high], abs=1e-12), name
        assert fast[name]["n_valid"] == ci.n_valid
        assert fast[name]["value"] == pytest.approx(ci.estimate)


def test_a_proportion_at_0_or_100_percent_gets_an_interval_not_a_point():
    """12 of 12 melanomas found: the percentile bootstrap says [1, 1]; Wilson's interval, on lesion groups when the
    data names them, keeps a lower bound below 1, and an interval that was wider already stays as it was."""
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(12, int), np.zeros(40, int)]
    p = np.r_[np.full(12, 0.9), rng.random(40) * 0.8]
    th = {"screening": 0.5}
    plain = B.metrics_with_ci(y, p, th, n_resamples=200, proportion_intervals="bootstrap")
    assert plain["sensitivity@screening"]["ci95"] == [1.0, 1.0]
    wide = B.metrics_with_ci(y, p, th, n_resamples=200)
    lo, hi = wide["sensitivity@screening"]["ci95"]
    assert hi == 1.0 and lo == pytest.approx(B.wilson_interval(1.0, 12)[0]) and 0.7 < lo < 0.8
    groups = np.r_[np.repeat(np.arange(4), 3), 100 + np.arange(40)]  # the 12 images are 4 lesions
    lo4 = B.metrics_with_ci(y, p, th, groups=groups, n_resamples=200)["sensitivity@screening"]["ci95"][0]
    assert lo4 == pytest.approx(B.wilson_interval(1.0, 4)[0]) and lo4 < lo
    for key in ("specificity@screening", "ppv@screening", "npv@screening", "accuracy@screening"):
        a, b = plain[key]["ci95"], wide[key]["ci95"]
        assert b[0] <= a[0] and b[1] >= a[1] and wide[key]["value"] == plain[key]["value"], key
    assert wide["roc_auc"] == plain["roc_auc"]  # ranking metrics keep the bootstrap
    with pytest.raises(ValueError, match="accepted: 'wilson-union', 'bootstrap'"):
        B.metrics_with_ci(y, p, th, n_resamples=5, proportion_intervals="exact")


def test_wilson_interval_matches_the_textbook_formula():
    # Newcombe (1998), example: 81 of 263 -> 0.2553 to 0.3662
    lo, hi = B.wilson_interval(81 / 263, 263)
    assert (lo, hi) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    assert B.wilson_interval(0.0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert B.wilson_interval(1.0, 10)[1] == pytest.approx(1.0, abs=1e-12)


def test_age_bands():
    assert [age_band(a) for a in ("5", "29.9", "30", "49", "50.0", "69", "70", "85", "", "nan", None, "x")] == [
        "<30", "<30", "30-49", "30-49", "50-69", "50-69", ">=70", ">=70", "unknown", "unknown", "unknown", "unknown"]


# ------------------------------------------------------------------ report and metrics.json


def test_html_report_parses_and_embeds_every_plot(report):
    out, results = report
    page = _parse(out / "report.html")
    embedded = [i for i in page.imgs if i.get("src", "").startswith("data:image/png;base64,")]
    assert len(embedded) == len(page.imgs)
    # per set: ROC, PR, reliability, 2 confusion matrices (2 thresholds), histograms, gallery, + compare ROC
    assert len(embedded) == 2 * 8
    for img in embedded:
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == PNG_MAGIC
        assert img.get("alt") and img.get("alt") == img.get("title")
    alts = [i["alt"] for i in embedded]
    for s in ("ham", "kaggle"):
        for what in ("ROC curve with operating points", "precision-recall curve",
                     "reliability diagram before and after temperature scaling",
                     "confusion matrix at the screening threshold",
                     "confusion matrix at the high_specificity threshold", "score histograms per class",
                     "most confident false negatives and false positives", "ROC curves of both models"):
            assert sum(a.startswith(f"{s}: ") and what in a for a in alts) == 1, (s, what)
    text = " ".join(page.text)
    assert text.count(DISCLAIMER) >= 2
    for needle in ("fake-1.0", "fakenet_b0", str(datasets_path(results, 0)), str(datasets_path(results, 1)),
                   "DeLong", "flat_0001.jpg", "image is nearly uniform", "Subgroups"):
        assert needle in text, needle
    # nothing outside the page: no external src/href
    html_text = (out / "report.html").read_text()
    assert "http://" not in html_text and "https://" not in html_text


def datasets_path(results, i):
    return results["sets"][i]["data"]


def test_metrics_json_has_cis_for_every_metric(report):
    out, _ = report
    res = json.loads((out / "metrics.json").read_text())
    assert res["disclaimer"] == DISCLAIMER
    assert res["settings"]["n_resamples"] == RESAMPLES and res["settings"]["prevalence"] == 0.05
    assert [s["name"] for s in res["sets"]] == ["ham", "kaggle"]
    ham, kag = res["sets"]
    assert ham["grouped_bootstrap"] and ham["n_groups"] == 44 and not kag["grouped_bootstrap"]
    assert kag["n"] == 16 and kag["split"] == "test"  # train/ ignored
    assert ham["n_cannot_assess"] == 1 and ham["n_listed"] == ham["n"] + 1
    expected = {"roc_auc", "average_precision", "partial_auc_above_80tpr", "specificity_at_95_sensitivity",
                "brier", "ece"} | {f"{k}@{t}" for t in ("screening", "high_specificity")
                                   for k in B.THRESHOLD_METRICS + B.PREVALENCE_METRICS}
    for s in res["sets"]:
        assert set(s["metrics"]) == expected
        for name, m in s["metrics"].items():
            lo, hi = m["ci95"]
            assert m["value"] is not None and lo is not None and lo <= hi, (s["name"], name, m)
            assert m["n_valid"] > 0.9 * RESAMPLES
        assert 0 <= s["metrics"]["partial_auc_above_80tpr"]["value"] <= 0.2
        assert set(s["confusion"]) == {"screening", "high_specificity"}
        assert s["calibration"]["temperature"] == 1.7
        assert s["calibration"]["ece_before"] != s["calibration"]["ece_after"]
    # old flat format still at the top level (first set, screening threshold)
    assert res["n"] == ham["n"] and res["roc_auc"] == pytest.approx(ham["metrics"]["roc_auc"]["value"])


def test_several_sets_write_separate_folders_and_one_predictions_file(report):
    out, results = report
    for s in results["sets"]:
        folder = out / s["output_folder"]
        for name in ("roc.png", "pr.png", "reliability.png", "confusion.png", "confusion_high_specificity.png",
                     "score_histograms.png", "error_gallery.png", "roc_compare.png"):
            assert (folder / name).read_bytes()[:8] == PNG_MAGIC, (folder, name)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["set"] for r in rows} == {"ham", "kaggle"}
    assert len(rows) == sum(s["n"] for s in results["sets"])
    refused = list(csv.DictReader((out / "cannot_assess.csv").open()))
    assert [Path(r["path"]).name for r in refused] == ["flat_0001.jpg"]
    assert (out / "predictions_compare.csv").is_file()


def test_compare_adds_delong_per_set(report):
    out, results = report
    cmp = results["compare"]
    assert cmp["model"]["kind"] == "torch checkpoint" and cmp["model"]["thresholds"] == {"screening": 0.3}
    assert [c["name"] for c in cmp["sets"]] == ["ham", "kaggle"]
    ham = cmp["sets"][0]
    assert ham["n_common"] == results["sets"][0]["n"]  # the flat image is refused by A only
    d = ham["delong"]
    assert d["p_value"] is not None and 0 <= d["p_value"] <= 1
    assert d["auc1"] == pytest.approx(results["sets"][0]["metrics"]["roc_auc"]["value"])
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert ham["compare"]["sensitivity@screening"]["ci95"][0] is not None
    assert "sensitivity@high_specificity" not in ham["compare"]  # B stores one threshold only
    assert "DeLong" in (out / "report.html").read_text()


def test_subgroups_listed_and_small_ones_flagged(report):
    out, results = report
    ham, kag = results["sets"]
    assert kag["subgroups"] == {}
    sub = ham["subgroups"]
    assert list(sub) == ["sex", "age band", "localization", "dx"]
    assert [r["value"] for r in sub["age band"]] == ["<30", "30-49", "50-69", ">=70", "unknown"]
    for rows in sub.values():
        assert sum(r["n"] for r in rows) == ham["n"] and sum(r["n_cannot_assess"] for r in rows) == 1
        for r in rows:
            assert r["small"] == (r["n"] < 30)
            if r["small"]:
                assert "fewer than 30" in r["note"]
    face = next(r for r in sub["localization"] if r["value"] == "face")
    assert face["small"] and face["n"] > 0
    dx = {r["value"]: r for r in sub["dx"]}
    assert dx["mel"]["roc_auc"] is None and dx["mel"]["sensitivity"]["value"] is not None
    assert dx["mel"]["specificity"] is None
    assert dx["nv"]["specificity"]["value"] is not None and dx["nv"]["sensitivity"] is None
    assert "roc_auc_vs_malignant" not in dx["mel"] and dx["nv"]["roc_auc_vs_malignant"]["value"] is not None
    sex = {r["value"]: r for r in sub["sex"]}
    assert sex["male"]["roc_auc"]["ci95"][0] is not None
    page = (out / "report.html").read_text()
    assert "⚠ n&lt;30" in page and "class='small'" in page
    assert "No subgroup metadata" in page  # the kaggle set


def test_benign_diagnoses_get_their_auc_against_every_melanoma():
    from sklearn.metrics import roc_auc_score

    from melanoma_detector.evaluation.subgroups import subgroup_metrics

    rng = np.random.default_rng(0)
    dx = np.array(["mel"] * 40 + ["nv"] * 120 + ["sk"] * 40, dtype=object)
    y = (dx == "mel").astype(int)
    # nevi are easy to tell from melanoma, keratoses hard: the per-diagnosis AUCs must show it
    p = np.where(dx == "mel", rng.uniform(0.4, 1.0, 200), np.where(dx == "nv", rng.uniform(0.0, 0.5, 200),
                                                                    rng.uniform(0.3, 1.0, 200)))
    rows = {r["value"]: r for r in subgroup_metrics(y, p, {"dx": list(dx)}, threshold=0.5, n_resamples=50)["dx"]}
    for d in ("nv", "sk"):
        keep = (dx == "mel") | (dx == d)
        auc = rows[d]["roc_auc_vs_malignant"]
        assert auc["value"] == pytest.approx(roc_auc_score(y[keep], p[keep]))
        assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
    assert rows["nv"]["roc_auc_vs_malignant"]["value"] > 0.9
    assert rows["sk"]["roc_auc_vs_malignant"]["value"] < 0.7
    assert "roc_auc_vs_malignant" not in rows["mel"]
    other = subgroup_metrics(y, p, {"sex": list(dx)}, threshold=0.5, n_resamples=20)["sex"]
    assert all("roc_auc_vs_malignant" not in r for r in other)  # diagnoses only


def test_summary_sets_both_models_on_the_images_delong_pairs(report):
    """The terminal summary printed A on all its images beside B on the common ones, so a refusal by one gate
    read as an AUC difference that DeLong, on the common images, did not find."""
    import copy

    from melanoma_detector.evaluation.report import format_summary

    _, results = report
    results = copy.deepcopy(results)
    c = results["compare"]["sets"][0]
    c["model"]["roc_auc"] = {"value": 0.4321, "ci95": [0.41, 0.45]}  # A on the common images, told apart
    lines = format_summary(results).splitlines()
    a_row = next(line for line in lines if line.strip().startswith("A (same imgs)"))
    assert "0.432" in a_row and str(c["n_common"]) in a_row
    assert any(line.strip().startswith("B (same imgs)") for line in lines)


def test_the_summary_says_when_the_threshold_is_a_default_not_a_fitted_one(report):
    """An interrupted run's checkpoint stores no thresholds; evaluate used 0.5 and said so only in metrics.json."""
    import copy

    from melanoma_detector.evaluation.report import format_summary

    _, results = report
    results = copy.deepcopy(results)
    assert "not fitted" not in format_summary(results).splitlines()[0]
    results["model"]["thresholds_note"] = "the model stores no thresholds: 0.5 used"
    first = format_summary(results).splitlines()[0]
    assert "(the model stores no thresholds: 0.5 used: not fitted on validation images)" in first


def test_a_rerun_without_compare_leaves_no_compare_files(datasets, tmp_path):
    _, kaggle = datasets
    out = tmp_path / "e"
    evaluate_model(FakeBundlePredictor(), kaggle, out_dir=out, progress=False, n_resamples=20,
                   compare=FakeCheckpointPredictor())
    assert (out / "predictions_compare.csv").is_file() and (out / "roc_compare.png").is_file()
    evaluate_model(FakeBundlePredictor(), kaggle, out_dir=out, progress=False, n_resamples=20)
    assert not (out / "predictions_compare.csv").exists() and not (out / "roc_compare.png").exists()


def test_single_set_keeps_plots_in_out_folder(datasets, tmp_path):
    _, kaggle = datasets
    res = evaluate_model(FakeBundlePredictor(), kaggle, out_dir=tmp_path / "e", progress=False, n_resamples=50)
    assert res["sets"][0]["output_folder"] == "."
    for name in ("report.html", "metrics.json", "predictions.csv", "roc.png", "confusion.png", "error_gallery.png"):
        assert (tmp_path / "e" / name).is_file(), name
    page = _parse(tmp_path / "e" / "report.html")
    assert len(page.imgs) == 7 and "DeLong" not in " ".join(page.text)


def test_same_seed_same_intervals_other_seed_others():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(40, int), np.ones(20, int)]
    p = np.clip(0.4 * y + 0.6 * rng.random(60), 0, 1)
    a, b, c = (B.metrics_with_ci(y, p, {"screening": 0.5}, n_resamples=80, seed=s) for s in (3, 3, 4))
    assert a == b and a["roc_auc"]["ci95"] != c["roc_auc"]["ci95"]


def test_duplicate_set_names_are_made_unique(datasets):
    _, kaggle = datasets
    sets = load_eval_sets([kaggle, str(kaggle)])
    assert [s.name for s in sets] == ["kaggle", "kaggle-2"]


# ------------------------------------------------------------------ CLI with a real tiny model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from conftest import train_tiny_bundle

    return train_tiny_bundle(tmp_path_factory, n_train=14, n_test=6, epochs_frozen=2, epochs_finetune=0, resamples=20)


def test_cli_bundle_vs_checkpoint_on_two_sets(tiny_models, datasets, tmp_path, capsys):
    root, run, bundle = tiny_models
    ham, _ = datasets
    out = tmp_path / "ev"
    rc = main(["evaluate", "--model", str(bundle), "--data", str(root), "--data", str(ham),
               "--compare", str(run), "--out", str(out), "--resamples", "100", "--seed", "2",
               "--prevalence", "0.02", "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert DISCLAIMER in stdout and f"report: {out / 'report.html'}" in stdout
    assert "AUC [95% CI]" in stdout and "DeLong" in stdout
    res = json.loads((out / "metrics.json").read_text())
    meta = json.loads((bundle / "metadata.json").read_text())
    assert res["model"]["version"] == meta["model_version"] and res["model"]["backbone"] == TINY_BACKBONE
    assert res["model"]["thresholds"] == meta["thresholds"]
    assert res["compare"]["model"]["kind"] == "torch checkpoint"
    assert [s["name"] for s in res["sets"]] == [root.name, "ham"]
    assert res["sets"][0]["n"] + res["sets"][0]["n_cannot_assess"] == 12  # test/ only
    assert "ppv_at_prevalence@screening" in res["sets"][0]["metrics"]
    page = _parse(out / "report.html")
    assert len(page.imgs) == 2 * 8
    assert meta["model_version"] in " ".join(page.text)


def test_cli_card_records_an_external_evaluation_of_the_bundle(tiny_models, datasets, tmp_path, capsys):
    import shutil

    root, _, bundle = tiny_models
    ham, _ = datasets
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    seen, unseen = tmp_path / "ev-seen", tmp_path / "ev-unseen"
    for data, out in ((root, seen), (ham, unseen)):
        assert main(["evaluate", "--model", str(copy), "--data", str(data), "--out", str(out),
                     "--resamples", "20", "--no-progress"]) == 0
    assert json.loads((unseen / "metrics.json").read_text())["model"]["trained_on"] == [str(root)]
    capsys.readouterr()
    # the training folder's own test images are not external, even though the model never trained on them
    assert main(["card", str(copy), "--external-eval", str(seen)]) == 2
    _one_line_error(capsys, "holds images of the data", "never saw")
    assert main(["card", str(copy), "--external-eval", str(unseen)]) == 0
    meta = json.loads((copy / "metadata.json").read_text())
    (entry,) = meta["external_validation"]
    assert entry["same_model"] and entry["unseen_verified"] and entry["note"] is None
    assert entry["metrics"]["roc_auc"]["value"] == json.loads((unseen / "metrics.json").read_text())["sets"][0][
        "metrics"]["roc_auc"]["value"]
    card = (copy / "MODEL_CARD.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| evaldata") or "/ham |" in line)
    assert "this bundle" in row and f"{entry['metrics']['roc_auc']['value']:.3f}" in row
    # the graph is untouched, so the bundle still loads and verifies
    from melanoma_detector.inference.bundle import load_bundle

    assert load_bundle(copy).metadata["graph"]["sha256"] == meta["graph"]["sha256"]


def test_cli_split_val_scores_the_runs_val_split_and_says_so(tiny_models, tmp_path):
    root, run, bundle = tiny_models
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(bundle), "--data", str(root), "--split-file", str(run / "split.csv"),
                 "--split", "val", "--out", str(out), "--resamples", "20", "--no-progress"]) == 0
    with (run / "split.csv").open() as fh:
        val = sum(r["split"] == "val" for r in csv.DictReader(fh))
    s = json.loads((out / "metrics.json").read_text())["sets"][0]
    assert s["split"] == "val" and s["n_listed"] == val > 0
    assert "figures at its thresholds are optimistic" in (out / "report.html").read_text()

def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)


def test_cli_error_cases(tiny_models, datasets, tmp_path, capsys):
    root, run, bundle = tiny_models
    missing = tmp_path / "no-such-data"
    # data is checked before the model is loaded: the missing model is not the error reported
    assert main(["evaluate", "--model", str(tmp_path / "none.pt"), "--data", str(missing)]) == 2
    _one_line_error(capsys, "no-such-data")
    assert main(["evaluate", "--model", str(bundle), "--data", str(root), "--data", str(missing),
                 "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "no-such-data")
    assert not (tmp_path / "o").exists()
    assert main(["evaluate", "--model", str(bundle), "--data", str(root), "--prevalence", "1.5"]) == 2
    _one_line_error(capsys, "--prevalence")
    assert main(["evaluate", "--model", str(bundle), "--data", str(root), "--compare", str(tmp_path / "x.pt")]) == 2
    _one_line_error(capsys, "x.pt")
    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", "--model", str(bundle), "--data", str(root), "--out", str(tmp_path / "afile"),
                 "--no-progress", "--resamples", "10"]) == 2
    _one_line_error(capsys, "afile")
    single = tmp_path / "single"
    make_class_folder(single, 2, np.random.default_rng(0))
    for f in (single / "benign").iterdir():
        f.unlink()
    assert main(["evaluate", "--model", str(bundle), "--data", str(single)]) == 2
    _one_line_error(capsys, "only one class")


def test_report_csvs_escape_formula_text_and_external_reads_it_back(datasets, tmp_path, monkeypatch):
    """predictions.csv / cannot_assess.csv: a path or set name starting with `=` gets a leading `'` (CSV injection),
    the probabilities stay numbers, and the external-validation leak check reads the real paths back."""
    import shutil

    from melanoma_detector.export.external import _scored_paths

    _, kaggle = datasets
    shutil.copytree(kaggle, tmp_path / "=kaggle")
    Image.new("RGB", (80, 80), (128, 128, 128)).save(tmp_path / "=kaggle" / "test" / "benign" / "-flat.jpg")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "e"
    res = evaluate_model(FakeBundlePredictor(), "=kaggle", out_dir=out, progress=False, n_resamples=20)
    assert res["sets"][0]["name"] == "=kaggle"  # JSON keeps the raw text
    rows = list(csv.DictReader((out / "predictions.csv").open(newline="")))
    assert rows and all(r["path"].startswith("'=kaggle") and r["set"] == "'=kaggle" for r in rows)
    assert all(0 <= float(r["probability_malignant"]) <= 1 for r in rows)
    (refused,) = csv.DictReader((out / "cannot_assess.csv").open(newline=""))
    assert refused["path"] == "'" + str(Path("=kaggle", "test", "benign", "-flat.jpg")) and refused["set"] == "'=kaggle"
    scored = _scored_paths(out, tmp_path)
    assert list(scored) == ["=kaggle"] and len(scored["=kaggle"]) == len(rows) + 1
    assert str(tmp_path / "=kaggle" / "test" / "benign" / "-flat.jpg") in scored["=kaggle"]
