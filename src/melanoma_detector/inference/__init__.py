"""Torch-free serving: ONNX Runtime + numpy + Pillow."""

from melanoma_detector.inference.bundle import Bundle, BundleError, default_bundle_dir, load_bundle
from melanoma_detector.inference.predictor import RESULT_COLUMNS, CannotAssess, Predictor, gradcam, overlay_heatmap

__all__ = [
    "RESULT_COLUMNS",
    "Bundle",
    "BundleError",
    "CannotAssess",
    "Predictor",
    "default_bundle_dir",
    "gradcam",
    "load_bundle",
    "overlay_heatmap",
]
