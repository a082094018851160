"""Crash-safe training: kill -9 a training subprocess mid-run, `--resume` it, and check the run
loses at most the epoch in progress and ends exactly where an uninterrupted run ends."""

import os
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_BACKBONE, TrainingKilled, kill_training_after, kill_training_at, make_class_folder, run_rows
from melanoma_detector.cli import main

EPOCHS = (3, 3)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    rng = np.random.default_rng(5)
    make_class_folder(root / "train", 24, rng, "tr")
    make_class_folder(root / "val", 8, rng, "va")
    make_class_folder(root / "test", 4, rng, "te")
    return root


def _config(tmp_path):
    # Image-based phase 1 (no feature cache) so that every epoch takes long enough to be killed
    # inside; patience high enough that no phase stops early.
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"train": {"feature_cache": False, "early_stopping_patience": 50,
                                              "reduce_lr_patience": 1, "phase2_mode": "plain"}}))
    return path


def _train_args(data, out, cfg, cache):
    return ["train", "--data", str(data), "--out", str(out), "--config", str(cfg), "--backbone", TINY_BACKBONE,
            "--no-pretrained", "--image-size", "64", "--epochs-frozen", str(EPOCHS[0]), "--epochs-finetune",
            str(EPOCHS[1]), "--batch-size", "8", "--cache-dir", str(cache), "--no-progress", "--seed", "7",
            "--threads", "1"]


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(layout, tmp_path):
    cfg = _config(tmp_path)
    reference = tmp_path / "reference"
    assert main(_train_args(layout, reference, cfg, tmp_path / "cache-ref")) == 0
    ref_rows = run_rows(reference)
    assert len(ref_rows) == sum(EPOCHS)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "melanoma_detector", *_train_args(layout, run, cfg, tmp_path / "cache")]
    kill_training_after(cmd, run, epochs=2, env={**os.environ, "PYTHONUNBUFFERED": "1"}, log=tmp_path / "killed.log")
    done_before = len(run_rows(run))
    assert 2 <= done_before < sum(EPOCHS)
    state = torch.load(run / "resume.pt", map_location="cpu", weights_only=True)
    assert state["stage"] in ("phase1", "phase2") and state["stage"] != "done"

    assert main(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 0
    rows = run_rows(run)
    assert [(r["phase"], int(r["epoch"])) for r in rows] == [(r["phase"], int(r["epoch"])) for r in ref_rows]
    assert [int(r["global_epoch"]) for r in rows] == list(range(1, sum(EPOCHS) + 1))
    # Epochs finished before the kill are kept as they were; the resumed ones continue the same
    # trajectory (same data order, augmentation, dropout and optimizer state).
    for got, want in zip(rows, ref_rows):
        for key in ("train_loss", "val_loss", "val_auc", "lr"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-5), (got, want, key)
    a = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(reference / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["best"] == b["best"]
    for k, v in b["model_state"].items():
        assert torch.allclose(a["model_state"][k].float(), v.float(), atol=1e-4), k
    assert torch.load(run / "resume.pt", map_location="cpu", weights_only=True)["stage"] == "done"


def test_resume_between_phases_continues_the_random_state(layout, tmp_path, monkeypatch):
    """Killed after phase 1 ended but before a phase-2 epoch did (resume.pt: phase2, epoch 0): the
    resumed phase 2 must draw the same dropout masks as an uninterrupted run."""

    cfg = _config(tmp_path)
    reference = tmp_path / "reference"
    assert main(_train_args(layout, reference, cfg, tmp_path / "cache-ref")) == 0

    run = tmp_path / "killed"
    kill_training_at(monkeypatch, "phase2")
    with pytest.raises(TrainingKilled):
        main(_train_args(layout, run, cfg, tmp_path / "cache"))
    monkeypatch.undo()
    state = torch.load(run / "resume.pt", map_location="cpu", weights_only=True)
    assert (state["stage"], state["epoch"]) == ("phase2", 0)

    assert main(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 0
    for got, want in zip(run_rows(run), run_rows(reference), strict=True):
        for key in ("train_loss", "val_loss", "val_auc"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-5), (got, want, key)


def test_resume_refuses_a_finished_run_and_changed_options(layout, tmp_path, capsys):
    cfg = _config(tmp_path)
    run = tmp_path / "run"
    args = _train_args(layout, run, cfg, tmp_path / "cache")
    args[args.index("--epochs-frozen") + 1] = "1"
    args[args.index("--epochs-finetune") + 1] = "0"
    assert main(args) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "already finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs-frozen", "5"]) == 2
    assert "drop --epochs-frozen" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["train", "--data", str(layout), "--out", str(run), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_metrics_csv_keeps_the_finished_epochs_when_a_rewrite_dies_midway(tmp_path, monkeypatch):
    """metrics.csv is rewritten whole every epoch; a process killed inside that write (seen once in
    CI: the kill -9 above landed there and left an empty file) must leave the previous rows."""
    import csv

    from conftest import run_rows
    from melanoma_detector.training.trainer import RunLogger

    logger = RunLogger(tmp_path)
    logger.add({"phase": "phase1", "epoch": 1, "val_auc": 0.5})
    logger.add({"phase": "phase1", "epoch": 2, "val_auc": 0.6})

    def die(self, rows):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(csv.DictWriter, "writerows", die)
    with pytest.raises(KeyboardInterrupt):
        logger.add({"phase": "phase1", "epoch": 3, "val_auc": 0.7})
    assert [(r["epoch"], r["val_auc"]) for r in run_rows(tmp_path)] == [("1", "0.5"), ("2", "0.6")]


def test_a_run_stopped_before_any_epoch_finished_resumes_without_rewriting_its_config(layout, tmp_path, monkeypatch,
                                                                                      capsys):
    import melanoma_detector.training.trainer as trainer

    run = tmp_path / "early"
    real = trainer.train_one_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    assert main(_train_args(layout, run, _config(tmp_path), tmp_path / "cache")) == 130
    written = (run / "config.yaml").read_text()
    assert yaml.safe_load(written)["data"]["split_file"] is None
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    assert main(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 0
    # the run's own split.csv was used, but config.yaml still repeats the run from its data alone
    assert (run / "config.yaml").read_text() == written
    # "*" marks an epoch that beat every earlier one (the checkpoint changed), not one that beat its own phase
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line and "val_auc" in line]
    rows = run_rows(run)
    assert len(lines) == len(rows)
    best = -1.0
    for line, row in zip(lines, rows):
        auc = float(row["val_auc"])
        assert (" * (" in line) == (auc > best), (line, best)
        best = max(best, auc)
