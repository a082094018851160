"""A mean-logit ensemble exported as one graph: its logit and Grad-CAM weights are those of the
mean logit, `melanoma export --model A B` serves it like any bundle, and members with different
preprocessing are refused."""

import json

import pytest
import torch

from melanoma_detector.cli import main


def _tiny_model(seed: int):
    from conftest import TINY_BACKBONE
    from melanoma_detector.models.factory import create_model

    torch.manual_seed(seed)
    model = create_model(TINY_BACKBONE, pretrained=False, allow_random_init=True, hidden=(16, 8), dropout=(0.1, 0.1))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the closed-form gradient is really exercised
        model.head.norm.running_mean.uniform_(-0.5, 0.5)
        model.head.norm.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("n_members", [2, 3])
def test_ensemble_logit_and_gradcam_weights_are_those_of_the_mean_logit(n_members):
    from melanoma_detector.export.onnx_export import EnsembleWrapper, ExportWrapper

    models = [_tiny_model(seed) for seed in range(n_members)]
    wrapper = EnsembleWrapper([ExportWrapper(m) for m in models]).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logit, _, fmap, cam_weights, gate = wrapper(x)
        single = [ExportWrapper(m)(x) for m in models]
    expected = torch.stack([m(x).squeeze(-1) for m in models]).detach().mean(dim=0)
    torch.testing.assert_close(logit, expected, atol=1e-5, rtol=1e-5)
    assert fmap.shape[1] == sum(s[2].shape[1] for s in single)
    torch.testing.assert_close(gate, single[0][4])

    # Autograd reference: mean over space of d(mean logit) / d(each member's feature map).
    fmaps = [m.forward_features(x).detach().requires_grad_(True) for m in models]
    mean_logit = torch.stack([m.head(m.pool(f)).squeeze(-1) for m, f in zip(models, fmaps)]).mean(dim=0)
    grads = torch.autograd.grad(mean_logit.sum(), fmaps)
    reference = torch.cat([g.mean(dim=(2, 3)) for g in grads], dim=1)
    torch.testing.assert_close(cam_weights, reference, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import train_tiny_bundle

    return train_tiny_bundle(tmp_path_factory, n_train=16, n_test=8, epochs_frozen=2, epochs_finetune=1, resamples=20)


def test_export_cli_builds_a_served_ensemble(tiny_run, tmp_path):
    from conftest import assert_serves_alike

    root, run, single = tiny_run
    out = tmp_path / "ensemble"
    assert main(["export", "--model", str(run), str(run), "--out", str(out), "--resamples", "20"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["backbone"].startswith("mean-logit ensemble of ")
    assert len(meta["training"]["members"]) == 2
    assert (out / "MODEL_CARD.md").read_text().count("phase 1 ") == 2  # one recipe per member
    # Two copies of one model: the ensemble must serve exactly that model, heatmap included.
    assert_serves_alike(single, out, min((root / "test" / "malignant").iterdir()))


def test_an_ensemble_without_validation_images_is_refused(tiny_run, tmp_path, capsys):
    """Its members' temperatures and thresholds describe their own logits, not the mean: it would serve
    miscalibrated probabilities and break its sensitivity promise."""
    _, run, _ = tiny_run
    out = tmp_path / "ensemble"
    assert main(["export", "--model", str(run), str(run), "--out", str(out), "--no-data"]) == 2
    err = capsys.readouterr().err
    assert "calibration and thresholds are fitted on validation images" in err and "\n" not in err.strip()
    assert not out.exists() or not any(out.iterdir())


def test_members_with_different_preprocessing_are_refused(tiny_run, tmp_path):
    from melanoma_detector.errors import UserError
    from melanoma_detector.export.bundle import export_bundle

    _, run, _ = tiny_run
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt["preprocessing"] = {**ckpt["preprocessing"], "input_size": 96}
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(UserError, match="differs .* in input_size"):
        export_bundle([run, other], tmp_path / "out", use_data=False, uncalibrated=True)
    # A different centre-crop fraction alone is served at the first member's.
    ckpt["preprocessing"] = {**ckpt["preprocessing"], "input_size": 64, "crop_pct": 0.5}
    torch.save(ckpt, other)
    meta = export_bundle([run, other], tmp_path / "out2", use_data=False, uncalibrated=True)
    assert meta["preprocessing"]["crop_pct"] != 0.5
    ckpt["preprocessing"] = {**ckpt["preprocessing"], "crop_pct": meta["preprocessing"]["crop_pct"],
                             "color_constancy": "shades_of_gray"}
    torch.save(ckpt, other)
    with pytest.raises(UserError, match="differs .* in color_constancy shades_of_gray against none"):
        export_bundle([run, other], tmp_path / "out3", use_data=False, uncalibrated=True)
    # A checkpoint from before colour constancy existed has no such key: it used none.
    del ckpt["preprocessing"]["color_constancy"]
    torch.save(ckpt, other)
    assert export_bundle([run, other], tmp_path / "out4", use_data=False, uncalibrated=True)["preprocessing"]["color_constancy"] == "none"


def test_a_split_whose_val_images_hold_one_class_is_a_one_line_error(tiny_run, tmp_path, capsys):
    import csv

    _, run, _ = tiny_run
    rows = list(csv.DictReader((run / "split.csv").open()))
    one_class = [r for r in rows if r["split"] != "val" or r["label"] == "0"]
    split = tmp_path / "split.csv"
    with split.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(one_class)
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "b"), "--split", str(split)]) == 2
    err = capsys.readouterr().err.strip()
    assert "one class only" in err and "\n" not in err and "Traceback" not in err


def _rows(split):
    import csv

    with split.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(rows, split):
    import csv

    split.parent.mkdir(parents=True, exist_ok=True)
    with split.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return split


def test_a_split_whose_val_or_test_images_a_member_trained_on_is_refused(tiny_run, tmp_path, capsys, caplog):
    """Calibration and metrics on images a member trained on would be optimistic, silently: another member whose
    run trained on this split's val images, or a --split whose val images the model trained on, is refused."""
    import shutil

    _, run, _ = tiny_run
    rows = _rows(run / "split.csv")
    val = [r for r in rows if r["split"] == "val"]
    # Member B: the same model, from a run that trained on A's val images and validated on as many train ones.
    moved = []
    for label in ("0", "1"):
        n = sum(r["label"] == label for r in val)
        moved += [r["key"] for r in rows if r["split"] == "train" and r["label"] == label][:n]
    other = [{**r, "split": "train" if r["split"] == "val" else "val" if r["key"] in moved else r["split"]}
             for r in rows]
    member_b = tmp_path / "b"
    _write_rows(other, member_b / "split.csv")
    shutil.copy(run / "checkpoint.pt", member_b / "checkpoint.pt")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", "--model", str(run), str(member_b), "--out", str(out), "--resamples", "20"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{len(val)} of its val/test images are in the train split of member 1" in err and "first: " in err
    assert "accepted" in err and "\n" not in err and not (out.exists() and any(out.iterdir()))
    # One model with another run's split: its val images are this model's training images.
    assert main(["export", "--model", str(run), "--split", str(member_b / "split.csv"), "--out", str(out)]) == 2
    assert "in the train split of member 0" in capsys.readouterr().err
    # A member without a split.csv cannot be checked: accepted, and said.
    bare = tmp_path / "bare.pt"
    shutil.copy(run / "checkpoint.pt", bare)
    caplog.clear()
    assert main(["export", "--model", str(run), str(bare), "--out", str(out), "--resamples", "20"]) == 0
    assert any("bare.pt: no split.csv beside it, so its training images cannot be checked" in m
               for m in caplog.messages)


def test_credits_and_licence_do_not_depend_on_member_order(tiny_run, tmp_path):
    """The bundle credits every member's data, and its licence is the most restrictive one."""
    from melanoma_detector.export.bundle import export_bundle

    _, run, _ = tiny_run
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["data"]["paths"] = ["/x/ham10000", *ckpt["config"]["data"]["paths"]]
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    a = export_bundle([run, other], tmp_path / "a", use_data=False, uncalibrated=True)
    b = export_bundle([other, run], tmp_path / "b", use_data=False, uncalibrated=True)
    assert a["training"]["data"] == b["training"]["data"]
    assert [c["name"] for c in a["training"]["data"]][0] == "HAM10000"
    assert a["licence"] == b["licence"] and "CC BY-NC-SA" in a["licence"]


def test_a_checkpoint_without_calibration_needs_validation_images(tiny_run, tmp_path, capsys, caplog):
    """An unbundled ensemble member stores no temperature or thresholds: T=1 and thresholds 0.5 are no
    calibration, whatever the card would say, so it is exported only with val images to calibrate on."""
    import shutil

    from melanoma_detector.export.bundle import export_bundle

    _, run, _ = tiny_run
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("temperature", "logit_bias", "thresholds"):
        ckpt.pop(key, None)
    member = tmp_path / "member"
    member.mkdir()
    torch.save(ckpt, member / "checkpoint.pt")
    capsys.readouterr()
    for extra in ([], ["--no-data"]):
        assert main(["export", "--model", str(member), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds no calibration" in err and "melanoma train" in err and "\n" not in err
    assert main(["export", "--model", str(member), "--out", str(tmp_path / "o"), "--split", str(run / "split.csv"),
                 "--resamples", "20"]) == 0
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert meta["calibration"]["n"] > 0 and meta["temperature"] != 1.0
    # The API's escape hatch, for inspecting the graph only.
    assert export_bundle(member, tmp_path / "p", use_data=False, uncalibrated=True)["temperature"] == 1.0
    # A checkpoint from `melanoma train` keeps its own calibration, as the warning says.
    calibrated = tmp_path / "calibrated"
    calibrated.mkdir()
    shutil.copy(run / "checkpoint.pt", calibrated / "checkpoint.pt")
    caplog.clear()
    meta = export_bundle(calibrated, tmp_path / "q")
    trained = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert meta["temperature"] == pytest.approx(trained["temperature"]) and "calibration" not in meta
    assert any("keeps the checkpoint's calibration and thresholds" in m for m in caplog.messages)
