"""Stochastic depth (`--drop-path`): the rate each residual block gets, that it acts only in train
mode and only on the trainable top, and a run that trains with it and refuses bad settings."""

import pytest
import torch
from timm.layers import DropPath
from torch import nn

from conftest import TINY_BACKBONE, phase2_calls, run_rows, spy_epochs, train_tiny
from melanoma_detector.errors import UserError
from melanoma_detector.models.factory import (
    apply_drop_path,
    create_model,
    set_trainable_top,
    split_backbone,
    train_mode,
)


def _model(backbone: str = TINY_BACKBONE):
    torch.manual_seed(0)
    model = create_model(backbone, allow_random_init=True)
    # timm starts each residual branch's last BatchNorm at zero, so a fresh branch adds nothing and
    # dropping it would change nothing: give every branch an output, as training does.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    return model


def _rates(backbone: nn.Module) -> list[float]:
    return [m.drop_path.drop_prob if isinstance(m.drop_path, DropPath) else 0.0
            for m in backbone.modules() if hasattr(m, "drop_path")]


# timm's tiny test EfficientNet has no block with an identity shortcut; its tiny ResNet has only such blocks.
RESIDUAL_BACKBONE = "test_resnet"


def test_rates_rise_linearly_from_zero_to_the_rate_at_the_last_block():
    model = _model("tf_efficientnet_lite0")
    n_residual = apply_drop_path(model.backbone, 0.3)
    rates = _rates(model.backbone)
    n = len(rates)
    assert n == 16 and n_residual == 9  # Lite0: 16 blocks, 9 with an identity shortcut
    assert rates == pytest.approx([0.3 * i / (n - 1) for i in range(n)])
    apply_drop_path(model.backbone, 0.0)  # and 0 takes it out again
    assert _rates(model.backbone) == [0.0] * n


def test_it_acts_in_train_mode_only():
    model = _model(RESIDUAL_BACKBONE)
    x = torch.randn(4, 3, 64, 64)
    model.backbone.train()
    assert torch.equal(model.forward_features(x), model.forward_features(x))  # off: deterministic
    apply_drop_path(model.backbone, 0.5)
    assert not torch.equal(model.forward_features(x), model.forward_features(x))
    model.eval()
    assert torch.equal(model.forward_features(x), model.forward_features(x))


def test_the_frozen_bottom_is_never_dropped():
    model = _model(RESIDUAL_BACKBONE)
    apply_drop_path(model.backbone, 0.5)
    frozen = set_trainable_top(model, 0.3)
    train_mode(model, frozen)
    bottom, top = split_backbone(model.backbone, 0.3)
    # the precondition that makes this a test: the frozen bottom holds a block that would drop paths
    assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in bottom.modules())
    x = torch.randn(4, 3, 64, 64)
    first = bottom(x)
    assert all(torch.equal(first, bottom(x)) for _ in range(5))
    assert any(isinstance(m.drop_path, DropPath) and m.drop_path.training
               for m in top.modules() if hasattr(m, "drop_path"))


@pytest.mark.parametrize("name", ["test_vit", TINY_BACKBONE])
def test_a_backbone_without_residual_drop_paths_is_refused_with_what_is_accepted(name):
    with pytest.raises(UserError, match="accepted: timm's EfficientNet"):
        apply_drop_path(_model(name).backbone, 0.2)


def test_a_run_trains_with_drop_path_and_refuses_bad_settings(seed_layout, tmp_path, capsys, monkeypatch):
    calls = spy_epochs(monkeypatch)
    assert train_tiny(seed_layout, tmp_path / "a", tmp_path / "cache", "--drop-path", "0.2",
                      "--backbone", RESIDUAL_BACKBONE, "--phase2-mode", "plain") == 0
    assert any(r["phase"] == "phase2" for r in run_rows(tmp_path / "a"))
    assert "drop_path: 0.2" in (tmp_path / "a" / "config.yaml").read_text()
    for args, _ in phase2_calls(calls):  # the model the step trained drops paths
        assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in args[0].modules())
    for bad in ("-0.1", "1"):
        assert train_tiny(seed_layout, tmp_path / "b", tmp_path / "cache", "--drop-path", bad) == 2
        assert "drop_path" in capsys.readouterr().err
