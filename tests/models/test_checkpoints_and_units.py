"""Backbone units, weights files and checkpoints that do not fit: found, and refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_BACKBONE
from melanoma_detector.errors import UserError
from melanoma_detector.models.factory import backbone_units, create_model


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "lcnet_050", TINY_BACKBONE, "resnet18"])
def test_units_compose_to_forward_features(name):
    """MobileNetV3's conv_head runs after pooling: counted as a unit, it broke the cached phase 2 and took an
    unfrozen slot (and the top LR) from a real block."""
    backbone = create_model(name, pretrained=False).backbone.eval()
    units = backbone_units(backbone)
    assert units is not None
    x = torch.randn(2, 3, 64, 64)
    y = x
    with torch.no_grad():
        for unit in units:
            y = unit(y)
        assert torch.allclose(y, backbone.forward_features(x), rtol=1e-4, atol=1e-5)


def test_a_layout_the_guess_does_not_fit_gets_no_units_and_keeps_each_modules_mode():
    backbone = create_model(TINY_BACKBONE, pretrained=False).backbone
    backbone.train()
    backbone.bn1.eval()  # a frozen part, as training sets it
    real = backbone.forward_features
    backbone.forward_features = lambda x: real(x) * 2  # composes otherwise than its parts suggest
    assert backbone_units(backbone) is None
    assert backbone.training and not backbone.bn1.training and backbone.blocks.training


def test_a_weights_file_of_another_architecture_is_refused(tmp_path):
    from melanoma_detector.models.weights import strict_load_backbone

    target = create_model(TINY_BACKBONE, pretrained=False).backbone
    state = dict(target.state_dict())
    state["blocks.0.0.se.conv_reduce.weight"] = torch.zeros(1)  # a layer this backbone does not have
    state["classifier.weight"] = torch.zeros(3, 3)  # a classifier is fine: the seed head replaces it
    with pytest.raises(UserError, match="1 not in this backbone"):
        strict_load_backbone(target, state, source="file")
    del state["blocks.0.0.se.conv_reduce.weight"]
    strict_load_backbone(target, state, source="file")


def test_a_checkpoint_that_does_not_fit_its_backbone_is_a_one_line_error():
    from melanoma_detector.models.checkpoint import model_from_checkpoint

    model = create_model(TINY_BACKBONE, pretrained=False)
    config = {"model": {"hidden": [512, 256], "dropout": [0.45, 0.35]}}
    good = {"backbone": TINY_BACKBONE, "config": config, "model_state": model.state_dict()}
    assert isinstance(model_from_checkpoint(good), nn.Module)
    with pytest.raises(UserError, match="do not fit backbone 'resnet18'"):
        model_from_checkpoint({**good, "backbone": "resnet18"})
    with pytest.raises(UserError, match="no 'config'"):
        model_from_checkpoint({"backbone": TINY_BACKBONE, "model_state": model.state_dict()})


def test_units_are_found_for_a_backbone_on_another_device_or_dtype():
    """The composition check ran a CPU float32 input: a backbone already on the GPU (or in another dtype) got no
    units, and training silently fell back to freezing by parameter order, without the cached phase 2."""
    backbone = create_model(TINY_BACKBONE, pretrained=False).backbone.to(torch.float64)
    units = backbone_units(backbone)
    assert units is not None and len(units) == len(backbone_units(create_model(TINY_BACKBONE, pretrained=False).backbone))
