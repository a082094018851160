"""Scoring images with a torch checkpoint (evaluation of checkpoints, parity tests, benchmarks).

Serving uses the torch-free `melanoma_detector.inference` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from melanoma_detector.calibration import calibrated_probabilities
from melanoma_detector.data.io import load_image
from melanoma_detector.errors import ImageDecodeError
from melanoma_detector.models.checkpoint import checkpoint_preprocessing, load_checkpoint
from melanoma_detector.preprocess import preprocess_image


class TorchPredictor:
    def __init__(self, checkpoint: str | Path, *, device: str = "cpu"):
        self.model, self.ckpt = load_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.pp = checkpoint_preprocessing(self.ckpt)
        self.temperature = float(self.ckpt.get("temperature", 1.0))
        self.logit_bias = float(self.ckpt.get("logit_bias", 0.0))
        self.threshold = float((self.ckpt.get("thresholds") or {}).get("screening", 0.5))
        thresholds = self.ckpt.get("thresholds") or {}
        # A checkpoint of `melanoma train` holds both operating points: its risk tiers are the ones `melanoma
        # export` would write into its bundle, so `predict --model RUN` answers with the same columns as a bundle.
        self.tiers = None
        if {"screening", "high_specificity"} <= set(thresholds):
            from melanoma_detector.export.bundle import risk_tiers

            self.tiers = risk_tiers({k: float(v) for k, v in thresholds.items()})

    def risk(self, probability: float) -> tuple[str | None, str]:
        """(level, recommendation) from the tiers; (None, "") for a checkpoint without both thresholds."""
        from melanoma_detector.inference.bundle import risk_of

        return risk_of(self.tiers or (), probability)

    def _load(self, path: str):
        try:
            return preprocess_image(load_image(path), self.pp), None
        except ImageDecodeError as exc:
            return None, str(exc)

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def predict_paths(self, paths: Sequence[str], *, batch_size: int = 16, progress: bool = False) -> list[dict[str, Any]]:
        from tqdm import tqdm

        results: list[dict[str, Any]] = []
        with ThreadPoolExecutor(2) as pool, tqdm(total=len(paths), disable=not progress, desc="predict") as bar:
            for start in range(0, len(paths), batch_size):
                chunk = list(paths[start : start + batch_size])
                loaded = list(pool.map(self._load, chunk))
                ok = [i for i, (arr, _) in enumerate(loaded) if arr is not None]
                probs = {}
                if ok:
                    lg = self.logits(np.stack([loaded[i][0] for i in ok]))
                    for i, v in zip(ok, calibrated_probabilities(lg, self.temperature, self.logit_bias)):
                        probs[i] = float(v)
                for i, p in enumerate(chunk):
                    if i in probs:
                        level, text = self.risk(probs[i])
                        results.append({
                            "path": str(p), "probability_malignant": probs[i],
                            "predicted_label": "malignant" if probs[i] >= self.threshold else "benign",
                            "risk_level": level, "recommendation": text, "status": "ok", "reason": "",
                        })
                    else:
                        results.append({
                            "path": str(p), "probability_malignant": None, "predicted_label": None,
                            "risk_level": None, "recommendation": "Cannot assess this image: " + loaded[i][1],
                            "status": "cannot_assess", "reason": loaded[i][1],
                        })
                bar.update(len(chunk))
        return results
