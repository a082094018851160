"""`melanoma evaluate` says how many scored images the model trained on (or chose its epoch, calibration and
thresholds on), by the records the model keeps of its split: never refused, always said."""

from __future__ import annotations

import csv
import html
import json
import logging
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import make_class_folder, train_tiny
from melanoma_detector.cli import main
from melanoma_detector.data.discovery import discover_all
from melanoma_detector.data.splits import assign_splits, train_fingerprint
from melanoma_detector.evaluation.evaluate import evaluation_samples, model_images, training_overlap
from melanoma_detector.evaluation.report import overlap_warning


def _split(run: Path) -> dict[str, list[dict[str, str]]]:
    with (run / "split.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {name: [r for r in rows if r["split"] == name] for name in ("train", "val", "test")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run on one plain class folder: the run splits it into train/val/test itself."""
    data = tmp_path_factory.mktemp("ovdata") / "lesions"
    make_class_folder(data, 12, np.random.default_rng(5), "im")
    run = tmp_path_factory.mktemp("ovrun") / "run"
    assert train_tiny(data, run, tmp_path_factory.mktemp("ovcache"), epochs_finetune=0) == 0
    return data, run


def _evaluate(model, out, *extra) -> dict:
    assert main(["evaluate", "--model", str(model), *extra, "--out", str(out), "--resamples", "20",
                 "--no-progress"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_a_run_evaluated_on_its_own_training_folder_warns_with_the_count(tiny_run, tmp_path, capsys, caplog):
    data, run = tiny_run
    split = _split(run)
    n_train, n_val, n = len(split["train"]), len(split["val"]), sum(map(len, split.values()))
    caplog.set_level(logging.WARNING)
    res = _evaluate(run, tmp_path / "ev", "--data", str(data), "--split", "all")
    s = res["sets"][0]
    assert s["n"] == n and 0 < n_train < n and n_val > 0
    assert s["overlap"]["checked"] and s["overlap"]["split_file"] == str(run / "split.csv")
    assert (s["overlap"]["train"], s["overlap"]["val"], s["overlap"]["of"]) == (n_train, n_val, n)
    line = (f"lesions: {n_train} of {n} scored images ({100 * n_train / n:.0f}%) are in the model's training split "
            f"and {n_val} ({100 * n_val / n:.0f}%) in its validation split")
    assert f"warning: {line}" in capsys.readouterr().out  # beside the figures
    assert any(line in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert line in html.unescape((tmp_path / "ev" / "report.html").read_text())
    assert "these figures overstate performance on new images" in overlap_warning("lesions", s["overlap"])
    assert {"roc_auc", "sensitivity@screening"} <= s["metrics"].keys()  # the figures are still all there


def test_its_test_split_is_not_flagged(tiny_run, tmp_path, capsys, caplog):
    data, run = tiny_run
    caplog.set_level(logging.WARNING)
    res = _evaluate(run, tmp_path / "ev", "--data", str(data), "--split-file", str(run / "split.csv"),
                    "--split", "test")
    ov = res["sets"][0]["overlap"]
    assert ov["checked"] and ov["train"] == 0 and ov["val"] == 0 and ov["of"] == len(_split(run)["test"])
    assert ov["in_training_folder"]  # a held-out split of a training collection: not external, but not trained on
    assert "warning:" not in capsys.readouterr().out
    assert not any("scored images" in r.getMessage() for r in caplog.records)


def test_a_run_on_the_data_it_trained_on_scores_its_own_test_split_by_default(tiny_run, tmp_path, capsys):
    """Scoring every image of a run's own data folder measured mostly its training images (a warning said so);
    the run's split.csv says which are its test images."""
    data, run = tiny_run
    res = _evaluate(run, tmp_path / "ev", "--data", str(data))
    ov = res["sets"][0]["overlap"]
    assert res["sets"][0]["n"] == len(_split(run)["test"]) and ov["train"] == 0 and ov["val"] == 0
    out = capsys.readouterr().out
    assert f"scoring the run's own test split ({run / 'split.csv'})" in out and "warning:" not in out
    other = tmp_path / "copy"  # another folder (a copy): every image, and the warning, as before
    shutil.copytree(data, other)
    res = _evaluate(run, tmp_path / "ev2", "--data", str(other))
    assert res["sets"][0]["n"] == sum(map(len, _split(run).values())) and "scoring the run's own" not in \
        capsys.readouterr().out


def test_the_compared_model_is_checked_too(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    res = _evaluate(run, tmp_path / "ev", "--data", str(data), "--compare", str(run), "--split", "all")
    ov_a, ov_b = res["sets"][0]["overlap"], res["compare"]["sets"][0]["overlap"]
    assert ov_b["checked"] and (ov_b["train"], ov_b["val"]) == (ov_a["train"], ov_a["val"]) and ov_b["train"] > 0
    out = capsys.readouterr().out
    assert "warning: lesions (model B): " in out and "warning: lesions: " in out
    assert "lesions (model B):" in html.unescape((tmp_path / "ev" / "report.html").read_text())


def test_a_model_with_no_split_record_says_overlap_could_not_be_checked(tiny_run, tmp_path, caplog):
    data, run = tiny_run
    alone = tmp_path / "elsewhere" / "model.pt"
    alone.parent.mkdir()
    shutil.copy2(run / "checkpoint.pt", alone)  # no split.csv beside it
    caplog.set_level(logging.WARNING)
    res = _evaluate(alone, tmp_path / "ev", "--data", str(data))
    ov = res["sets"][0]["overlap"]
    assert not ov["checked"] and ov["train"] is None and "no split.csv beside" in ov["note"]
    unchecked = [r.getMessage() for r in caplog.records if "could not check" in r.getMessage()]
    assert len(unchecked) == 1 and "no split.csv beside" in unchecked[0]
    # the data lies in the folder it trained on (its config says so): still said, as a possibility
    assert ov["in_training_folder"]
    assert "may overstate" in overlap_warning("lesions", ov)


def test_copies_of_training_images_are_matched_by_key_path_or_name_and_content(tiny_run, tmp_path):
    data, run = tiny_run
    seen = model_images(types.SimpleNamespace(ckpt={"config": {"data": {"paths": [str(data)]}}}), run)
    n_train = len(_split(run)["train"])
    copy = tmp_path / "lesions"  # the same folder name elsewhere: same keys
    shutil.copytree(data, copy)
    renamed = tmp_path / "subset"  # another name: the same file names and byte sizes
    shutil.copytree(data, renamed)
    links = tmp_path / "links"  # a folder of links into the training data
    for cls in ("benign", "malignant"):
        (links / cls).mkdir(parents=True)
        for p in (data / cls).iterdir():
            (links / cls / p.name).symlink_to(p)
    for folder in (copy, renamed, links, data):
        ov = training_overlap(evaluation_samples(folder), seen, str(folder))
        assert ov["train"] == n_train, folder
    # a changed file under a training image's name is another image
    other = tmp_path / "other"
    make_class_folder(other, 12, np.random.default_rng(99), "im")
    assert training_overlap(evaluation_samples(other), seen, str(other))["train"] == 0
    # other bytes of the same size under the same file names: under the training folder's name it is a re-encoded
    # copy (its keys count); under another folder name the names alone are not enough (same-size BMPs, 0001.jpg)
    for name in (data.name, "another-collection"):
        twin = tmp_path / "elsewhere" / name
        shutil.copytree(data, twin)
        for f in twin.rglob("*"):
            if f.is_file():
                raw = bytearray(f.read_bytes())
                raw[-3] ^= 0xFF  # inside the first 64 KiB of these small files, size unchanged
                f.write_bytes(bytes(raw))
        want = n_train if name == data.name else 0
        assert training_overlap(evaluation_samples(twin), seen, str(twin))["train"] == want, name


# ------------------------------------------------------------------ bundles, by their metadata


def _bundle(meta: dict, root: Path):
    return types.SimpleNamespace(bundle=types.SimpleNamespace(root=root, metadata=meta))


@pytest.fixture
def keys_only(grouped_manifest, tmp_path):
    """A keys-only split file (as configs/splits/default.csv) and the bundle metadata that records it."""
    samples = assign_splits(discover_all([str(grouped_manifest)]), val_fraction=0.2, test_fraction=0.2, seed=1)
    path = tmp_path / "splits" / "default.csv"
    path.parent.mkdir()
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "split"])
        w.writerows([s.key, s.split] for s in samples)
    meta = {"training": {"config": {"data": {"paths": [str(grouped_manifest)], "split_file": str(path)}},
                         "train_keys_sha256": train_fingerprint(s.key for s in samples if s.split == "train")},
            "splits": {"file": "splits/default.csv"}}  # relative to the folder export ran in
    return samples, path, meta


def test_a_bundle_is_checked_against_the_split_file_with_its_fingerprint(keys_only, grouped_manifest, tmp_path,
                                                                         monkeypatch):
    samples, path, meta = keys_only
    monkeypatch.chdir(tmp_path)
    seen = model_images(_bundle(meta, tmp_path / "models" / "b"))
    assert seen.record == "splits/default.csv" and seen.why_not is None
    copy = tmp_path / "copy"  # another name: found by file name and size, through the data folder it trained on
    shutil.copytree(grouped_manifest, copy)
    ov = training_overlap(evaluation_samples(copy), seen, str(copy))
    assert ov["train"] == sum(s.split == "train" for s in samples)
    assert ov["val"] == sum(s.split == "val" for s in samples)
    assert ov["in_training_folder"] is False
    test = evaluation_samples(grouped_manifest, split_file=path)
    assert training_overlap(test, seen, str(grouped_manifest))["train"] == 0


def test_a_bundle_whose_split_is_missing_or_another_is_not_checked(keys_only, tmp_path, monkeypatch):
    samples, path, meta = keys_only
    monkeypatch.chdir(tmp_path)
    other = json.loads(json.dumps(meta))
    other["training"]["train_keys_sha256"] = "0" * 64
    assert "train_keys_sha256 differs" in model_images(_bundle(other, tmp_path / "b")).why_not
    path.unlink()
    seen = model_images(_bundle(meta, tmp_path / "b"))
    assert seen.record is None and "not on this machine" in seen.why_not
    del meta["training"]["train_keys_sha256"]
    assert "no fingerprint" in model_images(_bundle(meta, tmp_path / "b")).why_not


def test_a_recalibrated_bundles_fitting_images_are_counted(keys_only, grouped_manifest, tmp_path, monkeypatch):
    samples, _, meta = keys_only
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "recal"
    root.mkdir()
    test = [s for s in samples if s.split == "test"]
    with (root / "recalibration_split.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "role", "reason"])
        w.writerows([s.path, s.label, s.group_key, "fit", ""] for s in test[:5])
        w.writerows([s.path, s.label, s.group_key, "holdout", ""] for s in test[5:])
    meta["recalibration"] = {"data": [str(grouped_manifest)], "split_file": "recalibration_split.csv"}
    ov = training_overlap(evaluation_samples(grouped_manifest, split_file=meta["training"]["config"]["data"][
        "split_file"]), model_images(_bundle(meta, root)), str(grouped_manifest))
    assert (ov["train"], ov["val"], ov["recalibration"]) == (0, 0, 5)
    assert "5 of" in overlap_warning("ham", ov) and "re-fitted" in overlap_warning("ham", ov)


def test_a_bundle_in_another_clone_finds_the_split_file_its_repository_ships(keys_only, grouped_manifest, tmp_path,
                                                                             monkeypatch):
    """The shipped metadata names /work/main/configs/splits/default.csv; a clone elsewhere holds the same file
    under its own root, which the fingerprint confirms."""
    samples, path, meta = keys_only
    clone = tmp_path / "clone"
    (clone / "configs" / "splits").mkdir(parents=True)
    shutil.copy(path, clone / "configs" / "splits" / "default.csv")
    path.unlink()  # only the clone's copy is left
    (clone / "models" / "default").mkdir(parents=True)
    meta = {**meta, "training": {**meta["training"], "config": {"data": {
        "paths": [str(grouped_manifest)], "split_file": "/nowhere/main/configs/splits/default.csv"}}}}
    monkeypatch.chdir(tmp_path / "clone" / "models")  # where the relative splits.file does not resolve
    seen = model_images(_bundle(meta, clone / "models" / "default"))
    assert seen.record == str(clone / "configs" / "splits" / "default.csv"), seen.why_not
    train = [s for s in evaluation_samples(grouped_manifest) if s.key in {x.key for x in samples if x.split == "train"}]
    assert training_overlap(train, seen, str(grouped_manifest))["train"] == len(train) > 0


def test_a_bundles_fingerprints_count_copies_under_other_names_and_sizes(tmp_path):
    """Renamed, resized and re-encoded copies of the images a bundle trained on escape the path, key and name
    checks; the perceptual hashes the bundle ships count them, and the warning says so."""
    from melanoma_detector.data.fingerprints import fingerprint_images

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.jpg"))
    if len(examples) < 12:
        pytest.skip("needs the 12 sample images in examples/")
    from PIL import Image

    root = tmp_path / "bundle"
    root.mkdir()
    prints = fingerprint_images({"train": [str(p) for p in examples[:4]], "val": [str(p) for p in examples[4:6]]})
    sha = prints.save(root / "seen_images.npz")
    meta = {"seen_images": {"file": "seen_images.npz", "sha256": sha}}
    data = tmp_path / "kaggle-like" / "train"
    for i, p in enumerate(examples):  # every example, squashed to 300x300 under a new name
        cls = "malignant" if "malignant" in p.name else "benign"
        (data / cls).mkdir(parents=True, exist_ok=True)
        Image.open(p).resize((300, 300)).save(data / cls / f"{cls}_{i}.jpg", quality=80)
    samples = evaluation_samples(data)
    seen = model_images(_bundle(meta, root))
    ov = training_overlap(samples, seen, str(data))
    assert ov["copies"] == {"train": 4, "val": 2}
    assert not ov["checked"] and ov["train"] is None  # no split record: the names alone find nothing
    text = overlap_warning("kaggle", ov)
    assert text.startswith(f"kaggle: 4 of {len(samples)} scored images (33%) are in the model's training split and 2")
    assert "perceptual hash" in text and "overstate" in text
    # a bundle without fingerprints says why copies were not looked for; a damaged file is refused, not trusted
    ov = training_overlap(samples, model_images(_bundle({}, root)), str(data))
    assert ov["copies"] is None and "no fingerprints" in ov["copies_note"]
    (root / "seen_images.npz").write_bytes(b"changed")
    ov = training_overlap(samples, model_images(_bundle(meta, root)), str(data))
    assert ov["copies"] is None and "sha256 differs" in ov["copies_note"]
