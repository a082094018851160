"""External validation entries: read from evaluate reports, refused when they are not external, rendered in
the model card."""

import json
from pathlib import Path

import pytest

from melanoma_detector.cli import main
from melanoma_detector.errors import UserError
from melanoma_detector.export.external import add_external, read_external_evaluation
from melanoma_detector.export.model_card import write_model_card

REPO = Path(__file__).resolve().parents[2]
SHA = "ab" * 32
SHIPPED = json.loads((REPO / "models" / "default" / "metadata.json").read_text())
# what evaluate records of the model it scored when that model is the shipped bundle (graph sha256 SHA)
SERVED = {"version": SHIPPED["model_version"], "temperature": SHIPPED["temperature"],
          "logit_bias": SHIPPED["logit_bias"], "thresholds": SHIPPED["thresholds"], "kind": "model bundle"}


def _metric(v, lo, hi):
    return {"value": v, "ci95": [lo, hi], "n_valid": 100}


def _report(tmp_path, name, *, data, trained_on, sha="other", path="runs/proxy", auc=0.74, served=None):
    out = tmp_path / name
    out.mkdir()
    model = {"path": path, "kind": "torch checkpoint", "version": "checkpoint", "backbone": "tf_efficientnet_lite0",
             "sha256": sha, "tta": False, "best_val_auc": 0.88,
             "temperature": 1.0, "logit_bias": 0.0, "thresholds": {"screening": 0.5}}
    model.update(SERVED if served is None and sha == SHA else served or {})
    if trained_on is not None:
        model["trained_on"] = trained_on
    sets = [{"name": Path(d).name, "data": d, "split": None, "n": 200, "n_malignant": 40,
             "thresholds": {"screening": 0.05, "high_specificity": 0.3},
             "metrics": {"roc_auc": _metric(auc, auc - 0.03, auc + 0.03), "ece": _metric(0.08, 0.06, 0.1),
                         "sensitivity@screening": _metric(0.82, 0.7, 0.9),
                         "specificity@screening": _metric(0.48, 0.4, 0.55)}} for d in data]
    (out / "metrics.json").write_text(json.dumps({"created": "2026-11-30", "model": model, "sets": sets}))
    return out


@pytest.fixture
def meta():
    meta = json.loads((REPO / "models" / "default" / "metadata.json").read_text())
    meta["graph"]["sha256"] = SHA
    meta.pop("external_validation", None)
    return meta


def test_proxy_needs_a_note_and_is_footnoted(tmp_path, meta):
    rep = _report(tmp_path, "ev", data=["/d/isic2017/train", "/d/isic2017/val"], trained_on=["/d/ham10000"])
    with pytest.raises(UserError, match="--note"):
        read_external_evaluation(rep, bundle_meta=meta)
    entries = read_external_evaluation(rep, bundle_meta=meta, note="same recipe, HAM10000 alone")
    assert [e["data"] for e in entries] == ["/d/isic2017/train", "/d/isic2017/val"]
    assert not any(e["same_model"] for e in entries) and all(e["unseen_verified"] for e in entries)
    add_external(meta, entries)
    card = write_model_card(tmp_path, meta).read_text()
    section = card[card.index("## External validation"):card.index("## Input gate")]
    assert section.count("proxy [1]") == 2 and "[2]" not in section  # one footnote for one model
    assert "0.740 (0.710-0.770)" in section and "0.820 / 0.480" in section
    assert "- [1] same recipe, HAM10000 alone; evaluated: `runs/proxy`, its own validation AUC 0.880" in section
    assert "AUC 0.74 for proxy models" in card


def test_bundle_itself_needs_no_note_and_rerecording_replaces(tmp_path, meta):
    rep = _report(tmp_path, "ev", data=["/d/other"], trained_on=["/d/ham10000"], sha=SHA, auc=0.8)
    add_external(meta, read_external_evaluation(rep, bundle_meta=meta))
    rep2 = _report(tmp_path, "ev2", data=["/d/other"], trained_on=["/d/ham10000"], sha=SHA, auc=0.81)
    add_external(meta, read_external_evaluation(rep2, bundle_meta=meta))
    (entry,) = meta["external_validation"]
    assert entry["same_model"] and entry["metrics"]["roc_auc"]["value"] == 0.81
    card = write_model_card(tmp_path, meta).read_text()
    assert "| d/other | 200 (40) | this bundle |" in card and "AUC 0.81 for this bundle" in card


def test_a_set_holding_copies_of_training_images_under_other_names_is_refused(tmp_path, meta):
    """Copies found by the bundle's fingerprints (`overlap.copies` in metrics.json) make a collection no external one,
    wherever its folder lies."""
    rep = _report(tmp_path, "ev", data=["/d/kaggle"], trained_on=["/d/ham10000"], sha=SHA)
    report = json.loads((rep / "metrics.json").read_text())
    report["sets"][0]["overlap"] = {"checked": False, "of": 200, "train": None, "val": None,
                                    "copies": {"train": 37, "val": 4}}
    (rep / "metrics.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match=r"copies of images the evaluated model trained on \(37\) or was calibrated "
                                        r"on \(4\) under another name, size or encoding") as e:
        read_external_evaluation(rep, bundle_meta=meta)
    assert "accepted: images that model never saw" in str(e.value) and "\n" not in str(e.value)
    report["sets"][0]["overlap"]["copies"] = {"train": 0, "val": 0}
    (rep / "metrics.json").write_text(json.dumps(report))
    assert read_external_evaluation(rep, bundle_meta=meta)[0]["unseen_verified"]


@pytest.mark.parametrize("data", ["/d/ham10000", "/d/ham10000/test", "/d"])
def test_data_the_model_trained_on_is_refused(tmp_path, meta, data):
    rep = _report(tmp_path, "ev", data=[data], trained_on=["/d/ham10000"], sha=SHA)
    with pytest.raises(UserError, match="holds images of the data"):
        read_external_evaluation(rep, bundle_meta=meta)


def test_a_manifest_listing_training_images_is_refused_and_refusals_are_shown(tmp_path, meta):
    """A set's folder may lie outside the training data while the images it lists (a manifest, links) do not."""
    rep = _report(tmp_path, "ev", data=["/elsewhere/manifest.csv"], trained_on=["/d/ham10000"], sha=SHA)
    (rep / "predictions.csv").write_text("path,label,probability_malignant,predicted_label,set,group\n"
                                         "/other/x.jpg,benign,0.1,benign,manifest.csv,\n")
    (rep / "cannot_assess.csv").write_text("set,path,label,reason\nmanifest.csv,/d/ham10000/benign/y.jpg,benign,r\n")
    with pytest.raises(UserError, match="first: /d/ham10000/benign/y.jpg"):
        read_external_evaluation(rep, bundle_meta=meta)
    # a relative path is relative to where evaluate ran, not to where the card is written
    metrics = json.loads((rep / "metrics.json").read_text())
    (rep / "metrics.json").write_text(json.dumps({**metrics, "working_folder": "/d"}))
    (rep / "cannot_assess.csv").write_text("set,path,label,reason\nmanifest.csv,ham10000/benign/y.jpg,benign,r\n")
    with pytest.raises(UserError, match="first: /d/ham10000/benign/y.jpg"):
        read_external_evaluation(rep, bundle_meta=meta)
    (rep / "metrics.json").write_text(json.dumps(metrics))
    (rep / "cannot_assess.csv").unlink()
    metrics = json.loads((rep / "metrics.json").read_text())
    metrics["sets"][0]["n_cannot_assess"] = 7
    (rep / "metrics.json").write_text(json.dumps(metrics))
    add_external(meta, read_external_evaluation(rep, bundle_meta=meta))
    assert "| elsewhere/manifest.csv | 200 (40); 7 refused by the input gate | this bundle |" in (
        write_model_card(tmp_path, meta).read_text())


def test_old_reports_read_training_data_from_the_run_config(tmp_path, meta):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  paths: [/d/ham10000]\n")
    rep = _report(tmp_path, "ev", data=["/d/ham10000/x"], trained_on=None, path=str(run))
    with pytest.raises(UserError, match="holds images of the data"):
        read_external_evaluation(rep, bundle_meta=meta, note="n")
    rep = _report(tmp_path, "ev2", data=["/d/isic"], trained_on=None, path=str(tmp_path / "gone"))
    (entry,) = read_external_evaluation(rep, bundle_meta=meta, note="n")
    assert entry["unseen_verified"] is None and entry["trained_on"] is None


def test_card_without_external_says_so(tmp_path, meta):
    card = write_model_card(tmp_path, meta).read_text()
    assert "_None recorded" in card and "no external validation is recorded" in card


def test_cli_card_errors_are_one_line(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nobundle")]) == 2
    assert "no model bundle" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{}")
    assert main(["card", str(REPO / "models" / "default"), "--external-eval", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a `melanoma evaluate` report" in err and "\n" not in err
    (tmp_path / "bad" / "metrics.json").write_text(json.dumps({"model": {}, "sets": [{"name": "x"}]}))
    assert main(["card", str(REPO / "models" / "default"), "--external-eval", str(tmp_path / "bad")]) == 2
    assert "needs n, n_malignant and metrics" in capsys.readouterr().err
    assert main(["card", str(REPO / "models" / "default"), "--external-eval", str(tmp_path / "none")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_shipped_model_card_is_rendered_from_its_metadata(tmp_path):
    """The shipped card is `melanoma card models/default` output, never edited by hand."""
    shipped = REPO / "models" / "default"
    meta = json.loads((shipped / "metadata.json").read_text())
    assert write_model_card(tmp_path, meta).read_text() == (shipped / "MODEL_CARD.md").read_text()


def test_a_formula_escaped_path_in_the_report_is_still_checked_for_training_images(tmp_path, meta):
    """evaluate writes `'=ham/...` for a relative path =ham/... (CSV injection guard); the leak check reads =ham/..."""
    rep = _report(tmp_path, "ev", data=["/elsewhere/=ham"], trained_on=["/d/=ham"], sha=SHA)
    metrics = json.loads((rep / "metrics.json").read_text())
    (rep / "metrics.json").write_text(json.dumps({**metrics, "working_folder": "/d"}))
    (rep / "cannot_assess.csv").write_text("set,path,label,reason\n'=ham,'=ham/benign/y.jpg,benign,r\n")
    with pytest.raises(UserError, match="first: /d/=ham/benign/y.jpg"):
        read_external_evaluation(rep, bundle_meta=meta)


def _recalibrated(meta):
    """`melanoma recalibrate` output of `meta`: the same graph, calibration and thresholds re-fitted on /d/site."""
    return {**meta, "model_version": meta["model_version"] + "+recal.20261202", "temperature": 0.9,
            "logit_bias": 0.25, "thresholds": {"screening": 0.11, "high_specificity": 0.4},
            "recalibration": {"data": ["/d/site"], "n_fit": 60, "n_fit_malignant": 12}}


def test_a_report_on_the_same_graph_at_other_thresholds_is_not_this_bundle(tmp_path, meta):
    """evaluate --model SOURCE; recalibrate SOURCE --data site: the source's report shares the recalibrated
    bundle's graph, not the calibration and thresholds its figures were computed at."""
    recal = _recalibrated(meta)
    rep = _report(tmp_path, "ev", data=["/d/elsewhere"], trained_on=["/d/ham10000"], sha=SHA)
    with pytest.raises(UserError, match="same graph served with another temperature, logit bias, thresholds, "
                                        "model version than this bundle's.*--note"):
        read_external_evaluation(rep, bundle_meta=recal)
    (entry,) = read_external_evaluation(rep, bundle_meta=recal, note="the source bundle, before recalibration")
    assert not entry["same_model"] and entry["unseen_verified"]
    # each of them alone is enough; a report that does not record the version is judged by the rest
    for change in ({"thresholds": {**SERVED["thresholds"], "screening": 0.2}}, {"temperature": 1.5},
                   {"logit_bias": 0.0}, {"version": "0.0.9"}, {"thresholds": {"screening": SERVED["thresholds"]["screening"]}}):
        rep = _report(tmp_path, f"ev{len(list(tmp_path.iterdir()))}", data=["/d/x"], trained_on=[], sha=SHA,
                      served={**SERVED, **change})
        with pytest.raises(UserError, match="--note"):
            read_external_evaluation(rep, bundle_meta=meta)
    rep = _report(tmp_path, "ev-nover", data=["/d/x"], trained_on=[], sha=SHA, served={**SERVED, "version": None})
    assert read_external_evaluation(rep, bundle_meta=meta)[0]["same_model"]


def test_the_images_a_bundle_was_recalibrated_on_are_not_external_to_it_whoever_scored_them(tmp_path, meta):
    recal = _recalibrated(meta)
    # the source bundle scored the site: a proxy, but on the very images the target's thresholds were fitted on
    rep = _report(tmp_path, "ev", data=["/d/site"], trained_on=["/d/ham10000"], sha=SHA)
    with pytest.raises(UserError, match=r"re-fitted on \(`melanoma recalibrate`\).*first: /d/site"):
        read_external_evaluation(rep, bundle_meta=recal, note="the source bundle")
    # the recalibrated bundle itself, in a report that did not record what it trained or was calibrated on
    served = {"version": recal["model_version"], "temperature": 0.9, "logit_bias": 0.25,
              "thresholds": recal["thresholds"]}
    for trained_on in (None, ["/d/ham10000"]):
        rep = _report(tmp_path, f"ev-{trained_on is None}", data=["/d/site/a"], trained_on=trained_on, sha=SHA,
                      served=served)
        with pytest.raises(UserError, match="first: /d/site/a"):
            read_external_evaluation(rep, bundle_meta=recal)


def test_a_report_of_this_bundle_is_checked_against_the_bundles_own_training_data(tmp_path, meta):
    """A report that does not record the training data cannot vouch for unseen images; the bundle's metadata can."""
    ham = meta["training"]["members"][0]["config"]["data"]["paths"][0]
    rep = _report(tmp_path, "ev", data=[ham + "/test"], trained_on=None, sha=SHA, path=str(tmp_path / "gone"))
    with pytest.raises(UserError, match="trained or was calibrated on"):
        read_external_evaluation(rep, bundle_meta=meta)
    rep = _report(tmp_path, "ev2", data=["/d/isic2019"], trained_on=None, sha=SHA, path=str(tmp_path / "gone"))
    (entry,) = read_external_evaluation(rep, bundle_meta=meta)
    assert entry["same_model"] and entry["unseen_verified"] and ham in entry["trained_on"]
