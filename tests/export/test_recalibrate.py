"""`melanoma recalibrate`: a bundle's calibration and thresholds re-fitted on another source, measured on
held-out lesion groups; the graph and the source bundle untouched."""

import csv
import json
from collections import Counter

import numpy as np
import pytest

from conftest import make_class_folder
from melanoma_detector.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import train_tiny_bundle

    root, _, bundle = train_tiny_bundle(tmp_path_factory, n_train=14, n_test=6, epochs_frozen=2, epochs_finetune=0,
                                        resamples=20)
    site = tmp_path_factory.mktemp("site") / "clinic"
    make_class_folder(site, 40, np.random.default_rng(11), "site")
    TRAINING_DATA.append(root)
    return bundle, site


TRAINING_DATA: list = []  # the tiny bundle's own data folder, for the refusal below


def test_recalibrated_bundle_serves_the_refitted_calibration(tiny, tmp_path, capsys):
    from melanoma_detector.evaluation.metrics import (
        apply_calibration,
        fit_temperature_bias,
        roc_auc,
        threshold_for_sensitivity,
    )
    from melanoma_detector.inference import Predictor

    bundle, site = tiny
    before = (bundle / "metadata.json").read_bytes()
    out = tmp_path / "recal"
    assert main(["recalibrate", "--model", str(bundle), "--data", str(site), "--out", str(out),
                 "--holdout", "0.25", "--resamples", "20", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "held out" in stdout and "before" in stdout and "Research software" in stdout
    assert (bundle / "metadata.json").read_bytes() == before  # the source bundle is never changed
    meta = json.loads((out / "metadata.json").read_text())
    src = json.loads(before)
    assert meta["graph"]["sha256"] == src["graph"]["sha256"]
    assert meta["model_version"].startswith(src["model_version"] + "+recal.")
    r = meta["recalibration"]
    assert r["n_fit"] + r["n_holdout"] + r["n_cannot_assess"] == 80
    assert r["n_holdout"] == meta["metrics"]["test"]["n"] > 0 and 0.15 < r["n_holdout"] / 80 < 0.35
    assert r["source_bundle"]["thresholds"] == src["thresholds"]
    assert meta["risk_tiers"][1]["min_probability"] == meta["thresholds"]["screening"]
    assert meta["seen_images"] == src["seen_images"]  # the same graph saw the same images
    assert (out / "seen_images.npz").read_bytes() == (bundle / "seen_images.npz").read_bytes()

    # redo the numbers from the served graph and the bundle's own record of which image did what
    with (out / "recalibration_split.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    roles = Counter(row["role"] for row in rows)
    assert roles == {"fit": r["n_fit"], "holdout": r["n_holdout"], **({"cannot_assess": r["n_cannot_assess"]}
                                                                      if r["n_cannot_assess"] else {})}
    by_role = {role: [row for row in rows if row["role"] == role] for role in ("fit", "holdout")}
    assert not {row["group"] for row in by_role["fit"]} & {row["group"] for row in by_role["holdout"]}
    p = Predictor(out)
    prep = p.image_prep()

    def raw(part):
        return np.array([float(p.run(prep.load(row["path"])[0][None])["logit"][0]) for row in part])

    z_fit, y_fit = raw(by_role["fit"]), np.array([int(row["label"]) for row in by_role["fit"]])
    t, b = fit_temperature_bias(z_fit, y_fit)
    assert (t, b) == pytest.approx((meta["temperature"], meta["logit_bias"]), rel=1e-4, abs=1e-6)
    assert threshold_for_sensitivity(y_fit, apply_calibration(z_fit, t, b), 0.95) == pytest.approx(
        meta["thresholds"]["screening"], rel=1e-4)
    z_held, y_held = raw(by_role["holdout"]), np.array([int(row["label"]) for row in by_role["holdout"]])
    assert roc_auc(y_held, apply_calibration(z_held, t, b)) == pytest.approx(meta["metrics"]["test"]["roc_auc"]["value"])
    served = p.predict(by_role["holdout"][0]["path"])["probability_malignant"]
    assert served == pytest.approx(float(apply_calibration(z_held[:1], t, b)[0]), abs=1e-6)
    card = (out / "MODEL_CARD.md").read_text()
    assert "by `melanoma recalibrate`" in card and "Source bundle's calibration | Re-fitted" in card
    assert "95% bootstrap CIs, 20 resamples" in card  # the card states the resamples actually drawn


def test_gate_keep_keeps_the_source_gate_and_drops_what_it_refuses(tiny, tmp_path):
    import hashlib

    bundle, site = tiny
    out = tmp_path / "keep"
    assert main(["recalibrate", "--model", str(bundle), "--data", str(site), "--out", str(out), "--gate", "keep",
                 "--resamples", "20", "--no-progress"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    src = json.loads((bundle / "metadata.json").read_text())
    assert meta["input_gate"] == src["input_gate"]
    digest = [hashlib.sha256((b / "ood.npz").read_bytes()).hexdigest() for b in (bundle, out)]
    assert digest[0] == digest[1]
    r = meta["recalibration"]
    assert r["gate"] == "keep" and r["holdout_refused_fraction"] is None
    assert r["n_cannot_assess"] == round(80 * r["source_gate_refused_fraction"])
    assert main(["recalibrate", "--model", str(bundle), "--data", str(site), "--out", str(tmp_path / "refit"),
                 "--holdout", "0", "--no-progress"]) == 0
    refit_meta = json.loads((tmp_path / "refit" / "metadata.json").read_text())
    refit = refit_meta["recalibration"]
    assert refit_meta["input_gate"]["ood"]["acquisition_variants"] == 2  # fitted by export's rule
    # the metadata says what the new gate was fitted on, not what the source's was
    assert "recalibration images" in refit_meta["input_gate"]["ood"]["threshold_rule"]
    assert refit_meta["input_gate"]["refitted"] == {"by": "melanoma recalibrate", "date": refit_meta["created"][:10],
                                                    "data": [str(site)], "n_fit": refit["n_fit"]}
    assert refit["n_fit"] + refit["n_cannot_assess"] == 80 and refit["n_holdout"] == 0
    # a refitted gate keeps the images the old one refused
    assert refit["n_fit"] - (r["n_fit"] + r["n_holdout"]) == r["n_cannot_assess"] - refit["n_cannot_assess"]


def test_the_recalibration_images_are_not_external_to_the_recalibrated_bundle(tiny, tmp_path, capsys):
    bundle, site = tiny
    out = tmp_path / "recal"
    assert main(["recalibrate", "--model", str(bundle), "--data", str(site), "--out", str(out), "--gate", "keep",
                 "--resamples", "20", "--no-progress"]) == 0
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(out), "--data", str(site), "--out", str(ev), "--resamples", "20",
                 "--no-progress"]) == 0
    assert str(site) in json.loads((ev / "metrics.json").read_text())["model"]["trained_on"]
    capsys.readouterr()
    assert main(["card", str(out), "--external-eval", str(ev)]) == 2  # its thresholds were fitted on these
    assert "trained or was calibrated on" in capsys.readouterr().err


def test_refuses_to_overwrite_and_one_class_data(tiny, tmp_path, capsys):
    bundle, site = tiny
    assert main(["recalibrate", "--model", str(bundle), "--data", str(site), "--out", str(bundle)]) == 2
    assert "the source bundle is never changed" in capsys.readouterr().err
    one = tmp_path / "one"
    make_class_folder(one, 3, np.random.default_rng(2))
    for f in (one / "malignant").iterdir():
        f.unlink()
    assert main(["recalibrate", "--model", str(bundle), "--data", str(one), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "one class" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        main(["recalibrate", "--data", str(site), "--out", str(tmp_path / "o"), "--holdout", "1.5"])
    assert exc.value.code == 2 and "fraction in [0, 1)" in capsys.readouterr().err


def test_holdout_split_keeps_groups_whole_and_classes_balanced():
    from melanoma_detector.data.discovery import Sample
    from melanoma_detector.data.splits import holdout_split

    samples = [Sample(f"/x/{i}.jpg", int(i % 5 == 0), group=f"L{i // 2}", key=f"k{i}") for i in range(200)]
    kept, held = holdout_split(samples, 0.3, seed=1)
    assert len(kept) + len(held) == 200 and 50 <= len(held) <= 70
    assert not {s.group_key for s in kept} & {s.group_key for s in held}
    share = Counter(s.label for s in held)[1] / len(held)
    assert abs(share - 0.2) < 0.06
    assert holdout_split(samples, 0, seed=1) == (samples, [])


@pytest.mark.parametrize("gate", ["refit", "keep"])
def test_interrupted_recalibration_leaves_no_half_bundle(tiny, tmp_path, monkeypatch, capsys, gate):
    """Ctrl-C in the bootstrap (after the re-fitted gate's ood.npz is written): --out does not appear, or an
    empty one stays empty, nothing is left beside it, and the same command then succeeds."""
    import melanoma_detector.export.recalibrate as recalibrate

    bundle, site = tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    parent = tmp_path / "results"
    for out in (parent / "recal", parent / "empty"):
        if out.name == "empty":
            out.mkdir()
        args = ["recalibrate", "--model", str(bundle), "--data", str(site), "--out", str(out), "--gate", gate,
                "--resamples", "20", "--no-progress"]
        with monkeypatch.context() as m:
            m.setattr(recalibrate, "_measure_holdout", interrupted)
            assert main(args) == 130
        assert "interrupted" in capsys.readouterr().err
        assert (not out.exists()) if out.name == "recal" else (out.is_dir() and not any(out.iterdir()))
        # no stage or temporary file left beside it
        assert sorted(p.name for p in parent.iterdir()) == (["empty", "recal"] if out.name == "empty" else [])
        assert main(args) == 0
        assert {p.name for p in out.iterdir()} == {"model.onnx", "metadata.json", "MODEL_CARD.md", "ood.npz",
                                                   "recalibration_split.csv", "seen_images.npz"}
        assert json.loads((out / "metadata.json").read_text())["recalibration"]["gate"] == gate
    assert sorted(p.name for p in parent.iterdir()) == ["empty", "recal"]


def test_the_models_own_training_images_are_refused(tiny, tmp_path, capsys):
    """Fitted on images it trained on, a bundle got T = 0.05 and a screening threshold of 0.99999 that labelled
    every melanoma benign; recalibration is for a new source only."""
    bundle, _ = tiny
    out = tmp_path / "recal"
    assert main(["recalibrate", "--model", str(bundle), "--data", str(TRAINING_DATA[0] / "train"), "--out", str(out),
                 "--resamples", "20", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "training and" in err and "accepted: labelled images of a new source" in err and "\n" not in err
    assert not out.exists()
