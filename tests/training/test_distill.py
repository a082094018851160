"""Knowledge distillation: the loss, the teachers' leak check and a run that distils."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from conftest import spy_epochs, train_tiny
from melanoma_detector.data.discovery import Sample
from melanoma_detector.data.splits import split_csv_fingerprint
from melanoma_detector.errors import UserError
from melanoma_detector.training.distill import check_no_teacher_leak, teacher_logits
from melanoma_detector.training.engine import Distillation, train_one_epoch, weighted_bce
from melanoma_detector.training.sampling import TensorBatches


def test_loss_is_the_hard_loss_at_weight_zero_and_adds_nothing_when_the_student_agrees():
    z = torch.tensor([1.5, -0.5, 0.2])
    y = torch.tensor([1.0, 0.0, 1.0])
    idx = torch.tensor([2, 0, 1])
    cw = (0.6, 3.0)
    teacher = torch.tensor([-0.5, 0.2, 1.5])  # item i's teacher logit; here equal to the student's
    hard = weighted_bce(z, y, cw)
    assert Distillation(teacher, weight=0.0).loss(z, y, idx, cw) == pytest.approx(hard.item())
    assert Distillation(teacher, weight=0.3, temperature=3.0).loss(z, y, idx, cw) == pytest.approx(0.7 * hard.item())
    disagreeing = Distillation(-teacher, weight=0.3, temperature=3.0).loss(z, y, idx, cw)
    assert disagreeing > 0.7 * hard.item() + 1e-3


def test_soft_targets_pull_the_model_against_the_labels_at_full_weight():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = torch.ones(64)
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = TensorBatches(x, y, batch_size=16, shuffle=True, seed=0)
    distill = Distillation(torch.full((64,), -4.0), weight=1.0, temperature=1.0)
    for _ in range(20):
        train_one_epoch(model, loader, opt, device=torch.device("cpu"), distill=distill)
    with torch.no_grad():
        p = torch.sigmoid(model(x)).mean().item()
    assert p < 0.1  # all labels say malignant; the teacher's -4 logit (p 0.018) won


def _write_split(run, rows):
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"")
    with (run / "split.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "path", "label", "group", "split"])
        w.writerows(rows)


def test_leak_check_refuses_teachers_trained_on_held_out_images_or_lesions(tmp_path, caplog):
    held = [Sample(path="/d/a.jpg", label=1, group="L1", split="test", source="ham", key="ham/a.jpg")]
    clean = tmp_path / "clean"
    _write_split(clean, [["ham/b.jpg", "/d/b.jpg", 0, "L2", "train"], ["ham/a.jpg", "/d/a.jpg", 1, "L1", "test"]])
    check_no_teacher_leak(clean, held)
    same_image = tmp_path / "image"
    _write_split(same_image, [["ham/a.jpg", "/d/a.jpg", 1, "L1", "train"]])
    same_lesion = tmp_path / "lesion"
    _write_split(same_lesion, [["ham/c.jpg", "/d/c.jpg", 1, "L1", "train"]])
    for teacher in (same_image, same_lesion):
        with pytest.raises(UserError, match="trained on 1 of this run's val/test"):
            check_no_teacher_leak(teacher, held)
    chose_on_it = tmp_path / "chose"
    _write_split(chose_on_it, [["ham/b.jpg", "/d/b.jpg", 0, "L2", "train"], ["ham/a.jpg", "/d/a.jpg", 1, "L1", "val"]])
    with pytest.raises(UserError, match="epoch was chosen on 1 of this run's test images"):
        check_no_teacher_leak(chose_on_it, held)
    other_source = tmp_path / "other"
    _write_split(other_source, [["isic/c.jpg", "/e/c.jpg", 1, "L1", "train"]])  # same id, another collection
    with caplog.at_level(logging.WARNING, logger="melanoma_detector.training.distill"):
        check_no_teacher_leak(other_source, held)  # accepted, but keys cannot rule out a renamed copy: said so
    assert "none of this run's (ham)" in caplog.text
    (clean / "split.csv").unlink()
    with pytest.raises(UserError, match="no split.csv"):
        check_no_teacher_leak(clean, held)
    with pytest.raises(UserError, match="no checkpoint there"):
        check_no_teacher_leak(tmp_path / "missing", held)


def _train(seed_layout, out, cache, *extra):
    return train_tiny(seed_layout, out, cache, *extra)


def test_a_run_distils_from_a_teacher_on_the_same_split_and_refuses_one_that_saw_its_val_images(
        seed_layout, tmp_path, capsys, caplog, monkeypatch):
    teacher = tmp_path / "teacher"
    assert _train(seed_layout, teacher, tmp_path / "cache") == 0
    student = tmp_path / "student"
    calls = spy_epochs(monkeypatch)
    assert _train(seed_layout, student, tmp_path / "cache", "--split-file", str(teacher / "split.csv"),
                  "--distill-from", str(teacher), "--distill-weight", "0.7") == 0
    # every step of both phases got the soft targets, at the weight asked for
    assert calls and all(kw["distill"] is not None and kw["distill"].weight == 0.7 for _, kw in calls)
    monkeypatch.undo()
    (cached_file,) = (tmp_path / "cache").glob("teacher-logits-*.npz")
    with np.load(cached_file) as cached:
        n_train = sum(1 for r in csv.DictReader((student / "split.csv").open()) if r["split"] == "train")
        assert cached["logits"].shape == (n_train,) and np.isfinite(cached["logits"]).all()
    config = (student / "config.yaml").read_text()
    assert str(teacher.resolve()) in config and "distill_weight: 0.7" in config
    # A second student of the same teacher reads the teacher's logits from the cache (and distils
    # in the cached phase 2, whose batches index the images the same way).
    with caplog.at_level(logging.INFO, logger="melanoma_detector.training.distill"):
        assert _train(seed_layout, tmp_path / "student2", tmp_path / "cache", "--split-file", str(teacher / "split.csv"),
                      "--distill-from", str(teacher), "--phase2-mode", "cached", "--cache-views", "2") == 0
    assert "teachers' logits from" in caplog.text
    capsys.readouterr()
    # Another seed draws another validation split from the same training folder: the teacher
    # trained on some of those images.
    assert _train(seed_layout, tmp_path / "leaky", tmp_path / "cache", "--seed", "11",
                  "--distill-from", str(teacher)) == 2
    assert "trained on" in capsys.readouterr().err


def test_bad_distillation_options_are_one_line_errors(seed_layout, tmp_path, capsys):
    assert _train(seed_layout, tmp_path / "a", tmp_path / "cache", "--distill-from", str(tmp_path / "nope")) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    assert _train(seed_layout, tmp_path / "b", tmp_path / "cache", "--distill-weight", "1.5") == 2
    assert "distill_weight" in capsys.readouterr().err


def test_a_bundle_teaches_as_its_checkpoint_does_and_only_students_of_its_own_training_images(
        seed_layout, tmp_path, capsys):
    from melanoma_detector.cli import main

    teacher = tmp_path / "teacher"
    assert _train(seed_layout, teacher, tmp_path / "cache") == 0
    bundle = tmp_path / "bundle"
    assert main(["export", "--model", str(teacher), "--out", str(bundle), "--resamples", "20"]) == 0
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["training"]["train_keys_sha256"] == split_csv_fingerprint(teacher / "split.csv")

    rows = list(csv.DictReader((teacher / "split.csv").open()))
    samples = [Sample(path=r["path"], label=int(r["label"]), split=r["split"], key=r["key"]) for r in rows]
    cpu = torch.device("cpu")
    from_graph = teacher_logits([bundle], samples, device=cpu, batch_size=5)
    from_checkpoint = teacher_logits([teacher], samples, device=cpu, batch_size=5)
    assert from_graph.shape == (len(samples),) and np.abs(from_graph - from_checkpoint).max() < 1e-4
    # The logits cache is keyed on the images themselves, not their relative keys: one replaced in place is
    # scored again, not served its old soft target.
    import os

    from PIL import Image

    cache = tmp_path / "teacher-cache"
    first = teacher_logits([teacher], samples, device=cpu, batch_size=5, cache_dir=cache)
    changed = samples[0].path
    Image.open(changed).transpose(Image.Transpose.ROTATE_90).save(changed)
    st = os.stat(changed)
    os.utime(changed, (st.st_atime, st.st_mtime + 10))
    again = teacher_logits([teacher], samples, device=cpu, batch_size=5, cache_dir=cache)
    assert len(list(cache.glob("teacher-logits-*.npz"))) == 2
    assert again[0] != first[0] and np.array_equal(again[1:], first[1:])

    split = str(teacher / "split.csv")
    assert _train(seed_layout, tmp_path / "student", tmp_path / "cache", "--split-file", split,
                  "--distill-from", str(bundle)) == 0
    capsys.readouterr()
    # Another seed draws other training images: the bundle may have seen this run's val images.
    assert _train(seed_layout, tmp_path / "leaky", tmp_path / "cache", "--seed", "11",
                  "--distill-from", str(bundle)) == 2
    assert "other images than this run's training split" in capsys.readouterr().err
    meta["training"].pop("train_keys_sha256")
    (bundle / "metadata.json").write_text(json.dumps(meta))
    assert _train(seed_layout, tmp_path / "unknown", tmp_path / "cache", "--split-file", split,
                  "--distill-from", str(bundle)) == 2
    assert "records no fingerprint of its training images" in capsys.readouterr().err
