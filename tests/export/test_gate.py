"""The input gate's fitting rule (export/gate.py) and `melanoma refit-gate`: acquisition variants, the
shrunk covariance, a threshold no copy of a fitted image sets, and a re-fitted copy of a bundle."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from melanoma_detector.cli import main
from melanoma_detector.export.gate import (
    acquisition_variant,
    fit_ood,
    mahalanobis,
    shrunk_covariance,
)


def test_acquisition_variants_are_seeded_and_keep_the_image_size():
    img = Image.fromarray(np.random.default_rng(0).integers(40, 220, (60, 80, 3), dtype=np.uint8))
    a = acquisition_variant(img, np.random.default_rng([0, 5]))
    b = acquisition_variant(img, np.random.default_rng([0, 5]))
    c = acquisition_variant(img, np.random.default_rng([0, 6]))
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(img))


def test_shrinkage_moves_the_covariance_towards_a_scaled_identity():
    x = np.random.default_rng(0).normal(size=(200, 5)) * np.array([5.0, 1.0, 1.0, 0.2, 0.2])
    s = np.cov(x.T, bias=True)
    mu = np.trace(s) / 5
    assert np.allclose(shrunk_covariance(x, 0.0)[0], s)
    assert np.allclose(shrunk_covariance(x, 1.0)[0], mu * np.eye(5))
    assert np.allclose(shrunk_covariance(x, 0.5)[0], 0.5 * s + 0.5 * mu * np.eye(5))
    assert 0 <= shrunk_covariance(x, "ledoit-wolf")[1] <= 1
    with pytest.raises(ValueError, match="accepted"):
        shrunk_covariance(x, 1.5)


def test_no_copy_of_a_fitted_image_sets_the_threshold():
    """In many dimensions fitted points lie closer to the fitted mean than new ones do; were the variants of a
    fitted image held out, they would pull the threshold below what new images get."""
    rng = np.random.default_rng(0)
    dim = 40
    base = rng.normal(size=(120, dim))
    feats = np.repeat(base, 3, axis=0) + rng.normal(scale=1e-3, size=(360, dim))  # three variants per image
    owner = np.repeat(np.arange(120), 3)
    by_image = fit_ood(feats, owner, quantile=0.5, variants=2)
    by_row = fit_ood(feats, quantile=0.5)
    assert by_image["n_fit"] == 60 and by_image["acquisition_variants"] == 2
    assert "2 acquisition variants" in by_image["threshold_rule"]
    new_images = np.median(mahalanobis(rng.normal(size=(4000, dim)), by_image))
    assert by_image["threshold"] == pytest.approx(new_images, rel=0.05)
    assert by_row["threshold"] < 0.95 * by_image["threshold"]


def test_the_wider_rule_accepts_a_shifted_source_that_the_tight_one_refuses():
    """A new device shifts the features most along the directions the fitting images barely vary in:
    the tight rule (Ledoit-Wolf, no variants) refuses it, the shrunk one does not, and both still refuse
    something far away."""
    rng = np.random.default_rng(2)
    scales = np.r_[np.full(4, 1.0), np.full(12, 0.1)]
    val = rng.normal(size=(800, 16)) * scales
    new_device = rng.normal(size=(300, 16)) * scales + np.r_[np.zeros(4), np.full(12, 0.2)]
    far = rng.normal(size=(50, 16)) * scales + np.r_[np.full(4, 4.0), np.zeros(12)]
    tight = fit_ood(val, shrinkage="ledoit-wolf", quantile=0.99)
    wide = fit_ood(val, shrinkage=0.5, quantile=0.995)
    refused = {k: (mahalanobis(new_device, g) > g["threshold"]).mean() for k, g in (("tight", tight), ("wide", wide))}
    assert refused["tight"] > 0.9 and refused["wide"] < 0.1
    assert (mahalanobis(far, wide) > wide["threshold"]).all() and (mahalanobis(far, tight) > tight["threshold"]).all()


@pytest.fixture(scope="module")
def bundle_and_split(tmp_path_factory):
    from conftest import train_tiny_bundle

    root, run, bundle = train_tiny_bundle(tmp_path_factory, n_train=70, n_test=6, epochs_frozen=1,
                                          epochs_finetune=0, resamples=20)
    return root, run / "split.csv", bundle


def test_refit_gate_writes_a_new_bundle_and_leaves_the_source(bundle_and_split, tmp_path, capsys):
    from melanoma_detector.inference import Predictor

    root, split, bundle = bundle_and_split
    src = json.loads((bundle / "metadata.json").read_text())
    assert src["input_gate"]["ood"]["acquisition_variants"] == 2  # export fits by the same rule
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    out = tmp_path / "refit"
    assert main(["refit-gate", "--model", str(bundle), "--data", str(root), "--split-file", str(split),
                 "--out", str(out), "--variants", "3", "--no-progress"]) == 0
    assert "gate threshold" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["graph"]["sha256"] == src["graph"]["sha256"] and meta["thresholds"] == src["thresholds"]
    assert meta["model_version"].startswith(src["model_version"] + "+gate.")
    gate = meta["input_gate"]["ood"]
    assert gate["acquisition_variants"] == 3 and gate["threshold"] > 0
    with split.open() as fh:
        n_val = sum(r["split"] == "val" for r in csv.DictReader(fh))
    assert meta["input_gate"]["refitted"]["n_val"] == n_val and gate["n_fit"] == n_val // 2
    assert 0 <= meta["metrics"]["test"]["ood_refused_fraction"] <= 1
    assert "3 acquisition variants" in (out / "MODEL_CARD.md").read_text()
    assert meta["seen_images"] == src["seen_images"]  # the same graph saw the same images
    assert (out / "seen_images.npz").read_bytes() == (bundle / "seen_images.npz").read_bytes()
    pred = Predictor(out)  # verifies both sha256s
    assert pred.ood["threshold"] == pytest.approx(gate["threshold"])


def test_refit_gate_refuses_bad_targets_and_another_split(bundle_and_split, tmp_path, capsys):
    root, split, bundle = bundle_and_split
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    args = ["refit-gate", "--model", str(bundle), "--data", str(root), "--no-progress"]
    assert main([*args, "--split-file", str(split), "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and (busy / "x").read_text() == "keep me"
    rows = list(csv.DictReader(split.open()))
    moved = next(r for r in rows if r["split"] == "train")
    moved["split"] = "val"  # a training image in validation: the gate would be fitted on seen images
    other = tmp_path / "other.csv"
    with other.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main([*args, "--split-file", str(other), "--out", str(tmp_path / "o2")]) == 2
    assert "not the ones" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert main([*args, "--split-file", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o3")]) == 2
    assert "nope.csv: not found" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_interrupted_refit_gate_leaves_no_half_bundle(bundle_and_split, tmp_path, monkeypatch, capsys):
    """Ctrl-C after ood.npz, the graph and metadata.json are written: --out does not appear (a half bundle
    there made the rerun fail with "exists and is not empty"), and the same command then succeeds."""
    import melanoma_detector.export.model_card as model_card

    root, split, bundle = bundle_and_split
    out = tmp_path / "results" / "refit"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    args = ["refit-gate", "--model", str(bundle), "--data", str(root), "--split-file", str(split),
            "--out", str(out), "--variants", "0", "--no-progress"]
    with monkeypatch.context() as m:
        m.setattr(model_card, "write_model_card", interrupted)
        assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "metadata.json", "MODEL_CARD.md", "ood.npz", "seen_images.npz"}
    assert list(out.parent.iterdir()) == [out]


def test_a_fit_on_already_scored_images_matches_the_full_pass(bundle_and_split):
    """Export and recalibrate have scored the images themselves; passing those features in must fit the same
    gate as scoring them again, with only the variants going through the graph."""
    from melanoma_detector.export.gate import fit_bundle_gate, gate_features
    from melanoma_detector.inference import Predictor
    from melanoma_detector.inference.predictor import run_graph

    root, split, bundle = bundle_and_split
    paths = [r["path"] for r in csv.DictReader(split.open()) if r["split"] == "val"]
    pred = Predictor(bundle)
    full_feats, full_owner = gate_features(pred, paths, variants=2)
    only_variants, owner = gate_features(pred, paths, variants=2, originals=False)
    assert len(only_variants) == 2 * len(paths) and np.array_equal(owner, np.repeat(np.arange(len(paths)), 2))
    assert np.allclose(only_variants, full_feats[np.tile([False, True, True], len(paths))],
                       atol=1e-5)
    own = run_graph(pred, paths, outputs=("gate_features",), progress=False)["gate_features"]
    full = fit_bundle_gate(pred, paths)
    reused = fit_bundle_gate(pred, paths, features=own)
    assert reused["n_fit"] == full["n_fit"]
    assert reused["threshold"] == pytest.approx(full["threshold"], rel=1e-4)
    assert np.allclose(reused["mean"], full["mean"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="one row per image"):
        fit_bundle_gate(pred, paths, features=own[:-1])
