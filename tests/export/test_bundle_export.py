"""Export a tiny trained run to a bundle and serve it torch-free."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from melanoma_detector.cli import main


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from conftest import train_tiny_bundle

    return train_tiny_bundle(tmp_path_factory, n_train=24, n_test=10, epochs_frozen=3, epochs_finetune=1, resamples=50)


def test_bundle_contents(tiny_bundle):
    _, _, bundle = tiny_bundle
    meta = json.loads((bundle / "metadata.json").read_text())
    for key in ("backbone", "preprocessing", "class_names", "temperature", "thresholds", "risk_tiers",
                "training", "metrics", "graph", "model_version", "input_gate", "licence"):
        assert key in meta, key
    assert meta["graph"]["opset"] >= 17
    assert [t["level"] for t in meta["risk_tiers"]] == ["Low", "Moderate", "High"]
    auc = meta["metrics"]["test"]["roc_auc"]
    assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
    ood = meta["input_gate"]["ood"]
    assert ood["threshold"] > 0 and ood["file"] == "ood.npz"
    assert "mean" not in ood and "precision" not in ood  # the arrays live in ood.npz, not in the JSON
    with np.load(bundle / "ood.npz", allow_pickle=False) as npz:
        assert npz["precision"].shape == (len(npz["mean"]), len(npz["mean"]))
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "never a diagnosis" in card and "Limitations" in card


def test_the_bundle_fingerprints_the_images_its_model_trained_and_was_calibrated_on(tiny_bundle, tmp_path, capsys):
    import csv

    from melanoma_detector.data.fingerprints import SeenImages

    root, run, bundle = tiny_bundle
    meta = json.loads((bundle / "metadata.json").read_text())
    with (run / "split.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    n = {s: sum(r["split"] == s for r in rows) for s in ("train", "val")}
    seen = meta["seen_images"]
    assert seen["file"] == "seen_images.npz" and seen["counts"] == n and seen["missing"] == {"train": 0, "val": 0}
    prints = SeenImages.load(bundle / "seen_images.npz", sha256=seen["sha256"])
    assert prints.counts == n and len(prints.hashes) == 2 * (n["train"] + n["val"])  # 4:3 images: + square crop
    assert "Fingerprints: `seen_images.npz`" in (bundle / "MODEL_CARD.md").read_text()
    # --no-fingerprints writes none, and a bundle exported over one with them keeps no stale file
    out = tmp_path / "plain"
    import shutil

    shutil.copytree(bundle, out)
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--out", str(out), "--overwrite", "--no-fingerprints",
                 "--resamples", "20", "--no-progress"]) == 0
    assert "bundle pass" not in capsys.readouterr().err  # --no-progress: no bars in a log
    assert "seen_images" not in json.loads((out / "metadata.json").read_text())
    assert not (out / "seen_images.npz").exists()
    assert "Fingerprints:" not in (out / "MODEL_CARD.md").read_text()


def test_card_gives_a_bundle_from_before_fingerprints_the_same_ones_export_writes(tiny_bundle, bundle_copy,
                                                                                  tmp_path, capsys):
    _, run, bundle = tiny_bundle
    meta = json.loads((bundle_copy / "metadata.json").read_text())
    del meta["seen_images"]
    (bundle_copy / "metadata.json").write_text(json.dumps(meta))
    (bundle_copy / "seen_images.npz").unlink()
    assert main(["card", str(bundle_copy), "--fingerprint-split", str(run / "split.csv")]) == 0
    assert "training and" in capsys.readouterr().out
    assert (bundle_copy / "seen_images.npz").read_bytes() == (bundle / "seen_images.npz").read_bytes()
    assert json.loads((bundle_copy / "metadata.json").read_text())["seen_images"] == \
        json.loads((bundle / "metadata.json").read_text())["seen_images"]
    assert (bundle_copy / "MODEL_CARD.md").read_text() == (bundle / "MODEL_CARD.md").read_text()
    other = tmp_path / "other.csv"  # the same rows, one training image moved to val: not the split it trained on
    rows = (run / "split.csv").read_text().splitlines()
    i = next(i for i, r in enumerate(rows) if r.endswith(",train"))
    rows[i] = rows[i][: -len("train")] + "val"
    other.write_text("\n".join(rows) + "\n")
    for split, why in ((other, "train_keys_sha256 differs"), (tmp_path / "none.csv", "not found")):
        assert main(["card", str(bundle_copy), "--fingerprint-split", str(split)]) == 2
        err = capsys.readouterr().err
        assert why in err and "accepted: the split file the bundle's models trained on" in err
        assert len(err.strip().splitlines()) == 1


def test_predictor_never_imports_torch(tiny_bundle):
    root, _, bundle = tiny_bundle
    img = next((root / "test" / "malignant").iterdir())
    code = (
        "import sys\n"
        "from melanoma_detector.inference import Predictor\n"
        f"p = Predictor({str(bundle)!r})\n"
        f"r = p.predict({str(img)!r}, tta=True, heatmap=True)\n"
        "assert r['status'] in ('ok', 'cannot_assess'), r\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m.startswith('torchvision')]\n"
        "assert not bad, bad[:5]\n"
        "print('OK', r['status'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_onnx_matches_torch_checkpoint(tiny_bundle):
    from melanoma_detector.inference import Predictor
    from melanoma_detector.models.torch_predictor import TorchPredictor

    root, run, bundle = tiny_bundle
    paths = sorted(str(p) for p in (root / "test").rglob("*.jpg"))
    onnx_pred = Predictor(bundle)
    torch_pred = TorchPredictor(run)
    torch_pred.temperature = onnx_pred.temperature  # the bundle recalibrates on the same val split
    a = [r["probability_malignant"] for r in onnx_pred.predict_paths(paths) if r["status"] == "ok"]
    b = [r["probability_malignant"] for r, o in zip(torch_pred.predict_paths(paths), onnx_pred.predict_paths(paths))
         if o["status"] == "ok"]
    assert len(a) > 0
    assert np.max(np.abs(np.array(a) - np.array(b))) <= 1e-4


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle, for tests that damage or rewrite it."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle[2], copy)
    return copy


def test_tampered_graph_is_refused(bundle_copy):
    from melanoma_detector.inference import BundleError, Predictor

    copy = bundle_copy
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        Predictor(copy)


def test_tampered_gate_statistics_are_refused(bundle_copy):
    from melanoma_detector.inference import BundleError, Predictor

    copy = bundle_copy
    with np.load(copy / "ood.npz") as npz:
        arrays = dict(npz)
    arrays["mean"] = arrays["mean"] + 1.0
    np.savez(copy / "ood.npz", **arrays)
    with pytest.raises(BundleError, match="ood.npz: sha256"):
        Predictor(copy)
    (copy / "ood.npz").unlink()
    with pytest.raises(BundleError, match="ood.npz: input-gate statistics missing"):
        Predictor(copy)


def test_bundle_with_inline_gate_statistics_still_loads(tiny_bundle, bundle_copy):
    """Bundles exported before ood.npz kept the gate's arrays in metadata.json."""
    from melanoma_detector.inference import Predictor

    copy, bundle = bundle_copy, tiny_bundle[2]
    meta = json.loads((copy / "metadata.json").read_text())
    with np.load(copy / "ood.npz") as npz:
        inline = {k: npz[k].tolist() for k in ("mean", "precision")}
    for key in ("file", "sha256"):
        meta["input_gate"]["ood"].pop(key)
    meta["input_gate"]["ood"].update(inline)
    (copy / "metadata.json").write_text(json.dumps(meta))
    (copy / "ood.npz").unlink()
    old, new = Predictor(copy), Predictor(bundle)
    np.testing.assert_array_equal(old.ood["precision"], new.ood["precision"])
    assert old.ood["threshold"] == new.ood["threshold"]


def test_predict_cli_with_bundle_and_gate(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    root, _, bundle = tiny_bundle
    Image.new("RGB", (200, 150), (128, 128, 128)).save(tmp_path / "flat.png")
    Image.new("RGB", (30, 30), (10, 200, 30)).save(tmp_path / "tiny.png")
    out_csv = tmp_path / "out.csv"
    rc = main(["predict", "--model", str(bundle), str(root / "test"), str(tmp_path / "flat.png"),
               str(tmp_path / "tiny.png"), "--csv", str(out_csv), "--no-progress"])
    assert rc == 0
    import csv

    rows = {r["path"]: r for r in csv.DictReader(out_csv.open())}
    assert set(next(iter(rows.values()))) >= {"path", "probability_malignant", "predicted_label", "risk_level",
                                              "recommendation", "status"}
    assert rows[str(tmp_path / "flat.png")]["status"] == "cannot_assess"
    assert "uniform" in rows[str(tmp_path / "flat.png")]["reason"]
    assert "64" in rows[str(tmp_path / "tiny.png")]["reason"]


def test_gradcam_matches_autograd(tiny_bundle):
    import torch

    from melanoma_detector.data.io import load_image
    from melanoma_detector.inference import Predictor, gradcam
    from melanoma_detector.models.checkpoint import load_checkpoint
    from melanoma_detector.preprocess import preprocess_image

    root, run, bundle = tiny_bundle
    model, _ = load_checkpoint(run)
    pred = Predictor(bundle)
    for img_path in sorted((root / "test" / "malignant").iterdir())[:3]:
        x = preprocess_image(load_image(img_path), pred.pp)
        out = pred.run(x[None])
        cam = gradcam(out["fmap"][0], out["cam_weights"][0])
        xt = torch.from_numpy(x[None])
        fmap = model.forward_features(xt)
        fmap.retain_grad()
        model.head(fmap.mean(dim=(2, 3))).sum().backward()
        w = fmap.grad.mean(dim=(2, 3))[0]
        ref = torch.relu((w[:, None, None] * fmap[0]).sum(0)).detach().numpy()
        if ref.max() > 0:
            ref = ref / ref.max()
            assert np.corrcoef(cam.ravel(), ref.ravel())[0, 1] >= 0.99


def test_data_credits_name_only_the_collections_trained_on():
    from melanoma_detector.export.bundle import _data_credits

    def names(paths):
        return [c["name"] for c in _data_credits(paths)]

    assert names(["../shared/data/ham10000"]) == ["HAM10000"]
    assert names(["/x/isic2017"]) == ["ISIC 2017 (Task 3 train + val)"]
    assert names(["/x/HAM10000", "/x/isic2017", "/mine/clinic"]) == ["HAM10000", "ISIC 2017 (Task 3 train + val)",
                                                                     "/mine/clinic"]


def test_shipped_bundle_records_the_training_images_of_the_committed_split():
    """Its members trained with `--split-file configs/splits/default.csv` (their configs say so), so a
    student on that split may distil from `models/default`."""
    from melanoma_detector.data.splits import split_csv_fingerprint

    repo = Path(__file__).resolve().parents[2]
    meta = json.loads((repo / "models" / "default" / "metadata.json").read_text())
    members = meta["training"].get("members") or [meta["training"]]
    assert all(Path(m["config"]["data"]["split_file"]).name == "default.csv" for m in members)
    assert meta["training"]["train_keys_sha256"] == split_csv_fingerprint(repo / "configs" / "splits" / "default.csv")


def test_export_never_replaces_a_bundle_unasked_nor_half_way(tiny_bundle, tmp_path, capsys, monkeypatch):
    import shutil

    _, run, bundle = tiny_bundle
    target = tmp_path / "models" / "default"
    shutil.copytree(bundle, target)
    (target / "NOTES.md").write_text("ours")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    args = ["export", "--model", str(run), "--out", str(target), "--resamples", "20"]
    assert main(args) == 2
    assert "holds a model bundle); accepted: a new or empty folder, or --overwrite" in capsys.readouterr().err
    # An export that fails part-way, after the graph is written, leaves the old bundle as it was.
    def fails(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("melanoma_detector.export.model_card.write_model_card", fails)
    assert main([*args, "--overwrite"]) == 130  # Ctrl-C
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["default"]  # no staging folder left behind
    monkeypatch.undo()
    # --overwrite with --no-data: the new bundle's files replace the old ones, the stale gate statistics go,
    # and a file of the user's stays.
    assert main([*args, "--overwrite", "--no-data"]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["MODEL_CARD.md", "NOTES.md", "metadata.json", "model.onnx"]
    assert (target / "NOTES.md").read_text() == "ours"
    from melanoma_detector.inference import Predictor

    assert Predictor(target).bundle.metadata["input_gate"].get("ood") is None
    assert ".export-" not in (target / "metadata.json").read_text() + (target / "MODEL_CARD.md").read_text()
    # A folder of other files is never a target.
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    assert main(["export", "--model", str(run), "--out", str(other), "--overwrite", "--no-data"]) == 2
    assert "holds no model bundle" in capsys.readouterr().err


def test_a_split_named_on_the_command_line_that_cannot_be_used_is_refused(tiny_bundle, tmp_path, capsys):
    import csv

    _, run, _ = tiny_bundle
    with (run / "split.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    moved = tmp_path / "split.csv"
    with moved.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "path": r["path"] + ".gone"} for r in rows])
    out = tmp_path / "b"
    assert main(["export", "--model", str(run), "--split", str(moved), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "val/test image(s) not found" in err and "accepted" in err
    assert not out.exists()  # refused before anything was written


def test_an_out_path_through_a_file_is_a_one_line_error(tmp_path, capsys):
    """--out below a file (or a file itself): refused in one line, not mkdir's FileExistsError traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for command, out in [("export", afile / "sub"), ("export", afile), ("unbundle", afile), ("unbundle", afile / "s")]:
        capsys.readouterr()
        args = ["--model", str(tmp_path / "nope")] if command == "export" else []
        assert main([command, *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == err.splitlines()[0] and "Traceback" not in err
        assert f"--out {out}: {afile} is a file; accepted: a new" in err, err
        if command == "export":
            assert "or a bundle with --overwrite" in err
    assert afile.read_text() == "x"
