"""The auxiliary diagnosis target: targets from labels.csv, the loss term, and a run that trains
with it and saves a checkpoint of the usual one-logit form."""

import numpy as np
import pytest
import torch

from conftest import TINY_BACKBONE, TrainingKilled, kill_training_at, train_tiny
from melanoma_detector.cli import main
from melanoma_detector.data.discovery import Sample
from melanoma_detector.models.checkpoint import load_checkpoint, read_checkpoint
from melanoma_detector.models.factory import create_model, serving_state
from melanoma_detector.training.auxiliary import DIAGNOSES, AuxDiagnosis, diagnosis_targets
from melanoma_detector.training.engine import train_one_epoch
from melanoma_detector.training.sampling import TensorBatches


def _sample(label, **meta):
    return Sample("x.jpg", label, None, None, "src", "src/x.jpg", meta)


def test_diagnosis_targets_map_ham_and_isic_codes_and_leave_unknown_out():
    samples = [_sample(0, dx="nv"), _sample(1, dx="mel"), _sample(0, dx="seborrheic_keratosis"),
               _sample(0, dx="Nevus"), _sample(0, dx="lentigo"), _sample(0), _sample(1)]
    t = diagnosis_targets(samples)
    assert [DIAGNOSES[i] if i >= 0 else None for i in t] == ["nv", "mel", "bkl", "nv", None, None, "mel"]


def test_aux_loss_ignores_unknown_targets_and_is_zero_without_any():
    aux = AuxDiagnosis(torch.tensor([1, -1, 0]), weight=2.0)
    logits = torch.tensor([[0.0, 3.0], [5.0, -5.0], [1.0, 1.0]], requires_grad=True)
    expected = 2.0 * torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([1, 0]))
    assert torch.allclose(aux.loss(logits, torch.tensor([0, 1, 2])), expected)
    none = aux.loss(logits, torch.tensor([1, 1]))
    assert none.item() == 0.0 and none.requires_grad


def test_the_model_returns_diagnosis_logits_only_in_train_mode_and_they_train():
    torch.manual_seed(0)
    model = create_model(TINY_BACKBONE, aux_classes=len(DIAGNOSES))
    x = torch.randn(4, 3, 32, 32)
    model.train()
    logit, aux_logits = model(x)
    assert logit.shape == (4,) and aux_logits.shape == (4, len(DIAGNOSES))
    model.eval()
    assert model(x).shape == (4,)
    assert not any(k.startswith("aux_head.") for k in serving_state(model.state_dict()))

    # One epoch with the term moves the zero-initialised layer; without it the layer stays zero.
    for weight, moves in ((1.0, True), (None, False)):
        m = create_model(TINY_BACKBONE, aux_classes=len(DIAGNOSES))
        batches = TensorBatches(torch.randn(16, 3, 32, 32), torch.tensor([0.0, 1.0] * 8), batch_size=8, shuffle=False)
        aux = AuxDiagnosis(torch.tensor([1, 0, 2, 0] * 4), weight=weight) if weight else None
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        out = train_one_epoch(m, batches, opt, device=torch.device("cpu"), aux=aux)
        assert np.isfinite(out["loss"])
        assert bool(m.aux_head.weight.abs().sum() > 0) is moves


def _train(data, out, cache, *extra):
    return train_tiny(data, out, cache, *extra, epochs_finetune=2)


def test_a_run_with_the_diagnosis_target_resumes_and_saves_a_one_logit_checkpoint(
        grouped_manifest, tmp_path, caplog, monkeypatch):
    import logging

    run = tmp_path / "run"
    kill_training_at(monkeypatch, "phase2 2/")
    with caplog.at_level(logging.INFO, logger="melanoma_detector.training.trainer"), pytest.raises(TrainingKilled):
        _train(grouped_manifest, run, tmp_path / "cache", "--aux-diagnosis-weight", "0.5")
    monkeypatch.undo()
    assert "auxiliary diagnosis target" in caplog.text
    # The resume state keeps the layer, so the interrupted run continues with it ...
    state = torch.load(run / "resume.pt", map_location="cpu", weights_only=False)
    assert (state["stage"], state["epoch"]) == ("phase2", 1)
    assert any(k.startswith("aux_head.") for k in state["model_state"])
    # the layer starts at zero and only the diagnosis loss moves it: it reached the step
    assert state["model_state"]["aux_head.weight"].abs().sum() > 0
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "aux_diagnosis_weight: 0.5" in (run / "config.yaml").read_text()
    # ... and checkpoint.pt holds the one-logit model that export and serving expect.
    ckpt = read_checkpoint(run / "checkpoint.pt")
    assert not any(k.startswith("aux_head.") for k in ckpt["model_state"])
    model, _ = load_checkpoint(run / "checkpoint.pt")  # a strict load into the plain model
    assert model.aux_head is None


def test_the_diagnosis_target_needs_diagnoses(seed_layout, tmp_path, capsys):
    assert _train(seed_layout, tmp_path / "a", tmp_path / "cache", "--aux-diagnosis-weight", "0.5") == 2
    err = capsys.readouterr().err
    assert "needs diagnoses" in err and "nv" in err
    assert _train(seed_layout, tmp_path / "b", tmp_path / "cache", "--aux-diagnosis-weight", "-1") == 2
    assert "aux_diagnosis_weight" in capsys.readouterr().err
