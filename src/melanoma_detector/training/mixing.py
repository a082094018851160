"""Batch mixing for the plain phase 2 (`--mix mixup|cutmix`): each selected batch is blended with a
shuffled copy of itself and the loss becomes the same blend of the two images' losses.

- mixup (Zhang et al., 2018): x = lam * x_a + (1 - lam) * x_b, lam ~ Beta(alpha, alpha).
- cutmix (Yun et al., 2019): a box of x_b is pasted into x_a; lam is the share of x_a left.

Why: with ~9,000 training images and 1,153 melanomas, the fine-tuned backbone starts to memorise
its training set within a dozen epochs (validation loss rises while training loss falls, see
docs/model-development.md); mixing is a regulariser that costs one extra loss term per batch.

The loss is blended rather than the labels, so every term the trainer adds (class weights,
distillation's soft targets, the diagnosis target) mixes the same way: lam * loss(a) +
(1 - lam) * loss(b), with each item's own targets. Distillation's soft target for a blend is
thus the teachers' logits on the two unmixed images, the usual approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from melanoma_detector.config import MIX_KINDS


@dataclass(frozen=True)
class Mixed:
    inputs: torch.Tensor
    perm: torch.Tensor  # item i was blended with item perm[i]
    lam: float  # weight of the original item


@dataclass(frozen=True)
class BatchMix:
    """Draws from torch's global generator, which the trainer seeds and saves for --resume."""

    kind: str = "mixup"
    alpha: float = 0.4
    prob: float = 0.5

    def __post_init__(self):
        if self.kind not in MIX_KINDS[1:]:
            raise ValueError(f"mix kind {self.kind!r} is not one of {', '.join(MIX_KINDS[1:])}")
        if not self.alpha > 0:
            raise ValueError(f"mix alpha {self.alpha} is not a positive number")
        if not 0 < self.prob <= 1:
            raise ValueError(f"mix probability {self.prob} is not in (0, 1]")

    def __call__(self, x: torch.Tensor) -> Mixed | None:
        """The mixed batch, or None when this batch stays as it is (probability 1 - prob)."""
        n = x.shape[0]
        if n < 2 or float(torch.rand(())) >= self.prob:
            return None
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        perm = torch.randperm(n)
        perm_d = perm.to(x.device)
        if self.kind == "mixup":
            return Mixed(lam * x + (1 - lam) * x[perm_d], perm, lam)
        h, w = x.shape[-2:]
        ch, cw = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
        out = x.clone()
        out[..., y0:y1, x0:x1] = x[perm_d, ..., y0:y1, x0:x1]  # only the box is copied
        # The box may be clipped at the border: the weight is the area actually kept.
        return Mixed(out, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w))
