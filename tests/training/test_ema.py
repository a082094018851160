"""The weight average of `--ema-decay`: its arithmetic, swapping it in for validation, and a run
that validates and keeps the averaged weights and resumes with the average intact."""

import pytest
import torch
from torch import nn

from conftest import TrainingKilled, kill_training_at, run_rows, train_tiny
from melanoma_detector.cli import main
from melanoma_detector.training.ema import WeightEma


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_update_averages_floats_with_the_warmup_decay_and_copies_integer_buffers():
    net = _net()
    ema = WeightEma(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()
    net(torch.randn(8, 3))  # moves the BatchNorm statistics and its step counter
    ema.update()
    d = 2 / 11  # min(0.9, (1 + 1) / (10 + 1)): early updates follow the weights closely
    assert torch.allclose(ema.shadow["0.weight"], d * w0 + (1 - d) * (w0 + 1.0))
    assert ema.shadow["1.num_batches_tracked"].item() == 1
    for _ in range(200):
        ema.update()
    assert ema.current_decay() == 0.9


def test_applied_swaps_the_average_in_and_restores_the_weights():
    net = _net()
    ema = WeightEma(net, decay=0.5)
    raw = net[0].weight.detach().clone()
    ema.shadow["0.weight"].fill_(7.0)
    with ema.applied():
        assert torch.all(net[0].weight == 7.0)
    assert torch.equal(net[0].weight, raw)

    other = WeightEma(_net(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and torch.all(other.shadow["0.weight"] == 7.0)
    with pytest.raises(ValueError, match="decay"):
        WeightEma(net, decay=1.0)


def test_a_run_keeps_the_averaged_weights_and_resumes_with_the_average(seed_layout, tmp_path, monkeypatch, capsys):
    # No phase 1, so the first phase-2 epoch is always the best so far and its weights are kept.
    opts = ("--ema-decay", "0.5", "--epochs-frozen", "0", "--threads", "1")
    reference = tmp_path / "reference"
    assert train_tiny(seed_layout, reference, tmp_path / "cache-ref", *opts, epochs_finetune=2) == 0
    assert "val_auc (EMA)" in capsys.readouterr().out

    run = tmp_path / "run"
    kill_training_at(monkeypatch, "phase2 2/")
    with pytest.raises(TrainingKilled):
        train_tiny(seed_layout, run, tmp_path / "cache", *opts, epochs_finetune=2)
    monkeypatch.undo()
    state = torch.load(run / "resume.pt", map_location="cpu", weights_only=True)
    assert (state["stage"], state["epoch"], state["best"]["phase"]) == ("phase2", 1, "phase2")
    shadow = state["ema"]["shadow"]
    assert state["ema"]["updates"] > 0
    # The kept weights are the average, not the weights the optimizer left.
    assert all(torch.equal(state["best"]["state"][k], v) for k, v in shadow.items())
    assert any(not torch.equal(state["model_state"][k], v) for k, v in shadow.items() if v.is_floating_point())

    assert main(["train", "--resume", str(run), "--no-progress", "--threads", "1"]) == 0
    # The second epoch's validation scores the average carried over from the first.
    for got, want in zip(run_rows(run), run_rows(reference), strict=True):
        assert float(got["val_auc"]) == pytest.approx(float(want["val_auc"]), abs=1e-5)
        assert float(got["val_loss"]) == pytest.approx(float(want["val_loss"]), rel=1e-4)
    a = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(reference / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["best"] == b["best"]
    for k, v in b["model_state"].items():
        assert torch.allclose(a["model_state"][k].float(), v.float(), atol=1e-4), k


def test_bad_decay_is_refused(seed_layout, tmp_path, capsys):
    assert train_tiny(seed_layout, tmp_path / "a", tmp_path / "cache", "--ema-decay", "1") == 2
    assert "ema_decay" in capsys.readouterr().err
