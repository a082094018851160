"""Auxiliary diagnosis target: besides the melanoma logit, phase 2 can train a linear layer on the
pooled features to predict each training image's diagnosis (HAM10000's `dx`, ISIC 2017's
`dx`: nevus, melanoma, seborrheic keratosis) with cross-entropy (`--aux-diagnosis-weight`).

Why: "benign" lumps together nevi, keratoses, basal cell carcinomas, vascular lesions and more,
which look nothing alike; asking the backbone to tell them apart gives it a richer signal than
the binary label alone (the SIIM-ISIC 2020 winners trained on diagnosis classes for the same
reason). Only the training loss changes: the auxiliary layer is dropped from the saved
checkpoint, so export, calibration and serving see the usual one-logit model.

Images without a known diagnosis (a user's benign/malignant folders) carry target -1 and add
nothing to the auxiliary term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from melanoma_detector.data.discovery import Sample

# HAM10000's seven codes; other collections' names map onto them.
DIAGNOSES: tuple[str, ...] = ("mel", "nv", "bkl", "bcc", "akiec", "vasc", "df")
DIAGNOSIS_ALIASES = {
    "melanoma": "mel", "nevus": "nv", "naevus": "nv", "seborrheic_keratosis": "bkl",
    "seborrhoeic_keratosis": "bkl", "benign_keratosis": "bkl", "basal_cell_carcinoma": "bcc",
    "actinic_keratosis": "akiec", "vascular": "vasc", "dermatofibroma": "df",
}
DIAGNOSIS_COLUMNS = ("dx", "diagnosis")


def diagnosis_of(sample: Sample) -> str | None:
    for col in DIAGNOSIS_COLUMNS:
        raw = (sample.meta.get(col) or "").strip().lower().replace(" ", "_").replace("-", "_")
        if raw:
            code = DIAGNOSIS_ALIASES.get(raw, raw)
            return code if code in DIAGNOSES else None
    return None


def diagnosis_targets(samples: Sequence[Sample]) -> np.ndarray:
    """Index into DIAGNOSES per sample (int64), -1 where unknown. A sample labelled malignant
    with no diagnosis counts as melanoma: in this project malignant means melanoma."""
    out = np.full(len(samples), -1, np.int64)
    for i, s in enumerate(samples):
        code = diagnosis_of(s)
        if code is None and s.label == 1:
            code = "mel"
        if code is not None:
            out[i] = DIAGNOSES.index(code)
    return out


@dataclass(frozen=True)
class AuxDiagnosis:
    """`targets[i]` is the diagnosis index of dataset item i (batches carry the item index
    third); the term added to the loss is weight * cross-entropy over the known targets."""

    targets: torch.Tensor
    weight: float = 0.5

    def loss(self, aux_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t = self.targets.to(aux_logits.device)[index.to(aux_logits.device).long()]
        if not bool((t >= 0).any()):
            return aux_logits.sum() * 0.0  # keeps the graph (DDP) with nothing to learn
        return self.weight * nn.functional.cross_entropy(aux_logits.float(), t, ignore_index=-1)
