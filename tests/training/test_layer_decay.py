"""Layer-wise LR decay (`--layer-decay`): which LR each unfrozen backbone unit gets, that Adam
really steps each unit by it, and a run that trains with it and refuses bad settings."""

import pytest
import torch

from conftest import TINY_BACKBONE, phase2_calls, run_rows, spy_epochs, train_tiny
from melanoma_detector.models.factory import create_model, layer_lr_scales, set_trainable_top, split_backbone
from melanoma_detector.training.trainer import _adam


def _model():
    torch.manual_seed(0)
    model = create_model(TINY_BACKBONE, allow_random_init=True)
    set_trainable_top(model, 0.6)
    return model


def test_each_unit_below_the_top_gets_one_more_factor_of_decay():
    model = _model()
    bottom, top = split_backbone(model.backbone, 0.6)
    scales = layer_lr_scales(model, 0.6, 0.5)
    units = list(top)
    assert len(units) >= 3
    for depth, unit in enumerate(reversed(units)):
        assert {scales[id(p)] for p in unit.parameters()} == {0.5 ** depth}
    # The frozen bottom and the head are not scaled (the head keeps the full LR).
    assert not any(id(p) in scales for p in bottom.parameters())
    assert not any(id(p) in scales for p in model.head.parameters())
    assert layer_lr_scales(model, 0.6, 1.0) == {}


def test_adam_steps_each_unit_by_its_scaled_lr():
    model = _model()
    _, top = split_backbone(model.backbone, 0.6)
    scales = layer_lr_scales(model, 0.6, 0.5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = _adam(model.head.l2_parameters(), trainable, lr=1e-2, l2=0.0, lr_scales=scales)
    assert opt.param_groups[0]["lr"] == 1e-2  # the logged LR stays the phase's base LR
    before = {id(p): p.detach().clone() for p in trainable}
    model.train()
    loss = model(torch.randn(4, 3, 64, 64)).square().mean()
    loss.backward()
    opt.step()
    # Adam's first step moves every weight with a non-zero gradient by ~lr (m / sqrt(v) = sign(g)).
    for depth, unit in enumerate(reversed(list(top))):
        steps = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in unit.parameters()])
        assert steps.max().item() == pytest.approx(1e-2 * 0.5 ** depth, rel=1e-3)


def test_a_run_trains_with_layer_decay_and_refuses_bad_settings(seed_layout, tmp_path, capsys, monkeypatch):
    calls = spy_epochs(monkeypatch)
    assert train_tiny(seed_layout, tmp_path / "a", tmp_path / "cache", "--layer-decay", "0.7",
                      "--phase2-mode", "plain", "--lr-schedule", "cosine", "--lr-finetune", "1e-3") == 0
    rows = [r for r in run_rows(tmp_path / "a") if r["phase"] == "phase2"]
    assert float(rows[0]["lr"]) == pytest.approx(1e-3)  # cosine's base LR is the unscaled one
    assert "layer_decay: 0.7" in (tmp_path / "a" / "config.yaml").read_text()
    for args, _ in phase2_calls(calls):  # the optimiser the step got scales the units below the top
        assert {0.7, 0.49} <= {round(g.get("lr_scale", 1.0), 4) for g in args[2].param_groups}
    for bad in ("0", "1.5"):
        assert train_tiny(seed_layout, tmp_path / "b", tmp_path / "cache", "--layer-decay", bad) == 2
        assert "layer_decay" in capsys.readouterr().err
