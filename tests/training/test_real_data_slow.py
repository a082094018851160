"""Slow tests on the real dermoscopic images in ../shared/data (skip when absent)."""

import csv
import json

import pytest

from conftest import shared_data_or_skip
from melanoma_detector.cli import main

pytestmark = pytest.mark.slow


def test_few_steps_on_real_ham10000_images(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ham = shared_data_or_skip("ham10000")
    rows = list(csv.DictReader((ham / "labels.csv").open()))
    mal = [r for r in rows if r["label"] == "malignant"][:40]
    ben = [r for r in rows if r["label"] == "benign"][:80]
    manifest = tmp_path / "subset.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        for r in mal + ben:
            w.writerow([str(ham / r["label"] / f"{r['image_id']}.jpg"), r["label"], r["group"]])
    out = tmp_path / "run"
    rc = main(["train", "--data", str(manifest), "--out", str(out), "--backbone", "tf_efficientnet_lite0",
               "--image-size", "128", "--epochs-frozen", "3", "--epochs-finetune", "1", "--max-steps-per-epoch", "2",
               "--cache-views", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    split = list(csv.DictReader((out / "split.csv").open()))
    sides = {}
    for r in split:
        sides.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val"]["roc_auc"] <= 1


def test_data_check_finds_isic2017_cross_split_duplicates(tmp_path):
    isic = shared_data_or_skip("isic2017")
    rc = main(["data", "check", str(isic), "--out", str(tmp_path / "report"), "--no-progress"])
    assert rc != 0  # leakage between train and val
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["leakage"] is True
    exact_cross = [g for g in report["exact_duplicates"] if g.get("cross_split")]
    assert exact_cross, "the byte-identical train/val images of ISIC 2017 were not found"
