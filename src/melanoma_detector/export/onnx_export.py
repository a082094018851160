"""Export a checkpoint to an ONNX graph that serves everything the torch-free predictor needs.

Outputs of the graph (batch dimension dynamic):
  logit     (B,)        the uncalibrated logit (temperature is applied by the predictor)
  features  (B, C)      pooled backbone features, for the out-of-distribution gate
  fmap      (B, C, H, W) the last convolutional feature map, for Grad-CAM
  cam_weights (B, C)    d logit / d fmap averaged over space: Grad-CAM's channel weights
  gate_features (B, 2K) per-channel mean and std of the frozen (ImageNet) part's output, for the
                        out-of-distribution gate: generic image statistics that fine-tuning
                        leaves untouched separate non-dermoscopy images far better than the
                        task-tuned pooled features do (docs/benchmarks.md, input gate)

The head is a small MLP on the pooled feature map, so the gradient of the logit with respect to
the feature map has a closed form (ReLU masks times weight matrices); computing it inside the
graph gives exact Grad-CAM at serve time with no autograd and no torch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from melanoma_detector.errors import UserError
from melanoma_detector.inference.bundle import sha256_file
from melanoma_detector.models.factory import MelanomaNet, split_backbone

OUTPUT_NAMES = ["logit", "features", "fmap", "cam_weights", "gate_features"]


def gate_fraction_of(ckpt: dict) -> float:
    """Where a checkpoint's gate features are cut: the top of its frozen part, as it trained."""
    return float(ckpt["config"]["train"].get("unfreeze_fraction", 0.3))


class ExportWrapper(nn.Module):
    def __init__(self, model: MelanomaNet, *, gate_fraction: float = 0.3):
        super().__init__()
        self.model = model.eval()
        parts = split_backbone(model.backbone, gate_fraction)
        self.bottom, self.top = parts if parts is not None else (None, None)

    def forward(self, x: torch.Tensor):
        if self.bottom is not None:
            mid = self.bottom(x)
            gate = torch.cat([mid.mean(dim=(2, 3)), mid.std(dim=(2, 3))], dim=1)
            fmap = self.top(mid)
        else:
            fmap = self.model.forward_features(x)
            gate = torch.cat([fmap.mean(dim=(2, 3)), fmap.std(dim=(2, 3))], dim=1)
        pooled = fmap.mean(dim=(2, 3))
        head = self.model.head
        # Head in eval mode: BatchNorm is affine, dropout is identity.
        bn = head.norm
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        z = (pooled - bn.running_mean) * scale + bn.bias
        z1 = head.fc1(z)
        h1 = torch.relu(z1)
        z2 = head.fc2(h1)
        h2 = torch.relu(z2)
        logit = head.out(h2).squeeze(-1)
        g2 = head.out.weight * (z2 > 0).to(z2.dtype)  # (B, 256)
        g1 = (g2 @ head.fc2.weight) * (z1 > 0).to(z1.dtype)  # (B, 512)
        g_pooled = (g1 @ head.fc1.weight) * scale  # (B, C)
        hw = fmap.shape[2] * fmap.shape[3]
        cam_weights = g_pooled / hw  # mean over space of d logit / d fmap
        return logit, pooled, fmap, cam_weights, gate


class EnsembleWrapper(nn.Module):
    """Several models on the same preprocessed image, served as one graph with the same outputs.

    The logit is the members' mean. Their feature maps are concatenated along channels with each
    member's Grad-CAM weights divided by the number of members, so the served Grad-CAM
    (ReLU of the weighted channel sum) is exactly that of the mean logit. The gate features are
    the first member's: the input gate models generic image statistics, not the task.
    """

    def __init__(self, members: list[ExportWrapper]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor):
        outs = [m(x) for m in self.members]
        n = len(outs)
        logit = torch.stack([o[0] for o in outs]).mean(dim=0)
        pooled = torch.cat([o[1] for o in outs], dim=1)
        fmap = torch.cat([o[2] for o in outs], dim=1)
        cam_weights = torch.cat([o[3] / n for o in outs], dim=1)
        return logit, pooled, fmap, cam_weights, outs[0][4]


def export_onnx(model: MelanomaNet | list[MelanomaNet], path: str | Path, *, input_size: int, opset: int = 17,
                gate_fraction: float | list[float] = 0.3) -> str:
    """Write the fp32 graph to `path`; returns its sha256. A list of models exports their
    mean-logit ensemble (`EnsembleWrapper`); their last feature maps must have the same size."""
    path = Path(path)
    models = model if isinstance(model, list) else [model]
    fractions = gate_fraction if isinstance(gate_fraction, list) else [gate_fraction] * len(models)
    wrappers = [ExportWrapper(m.cpu().float().eval(), gate_fraction=f) for m, f in zip(models, fractions)]
    dummy = torch.randn(2, 3, input_size, input_size)
    if len(wrappers) == 1:
        wrapper = wrappers[0]
    else:
        with torch.no_grad():
            sizes = {tuple(w(dummy)[2].shape[2:]) for w in wrappers}
        if len(sizes) > 1:
            raise UserError(f"ensemble members give last feature maps of different sizes {sorted(sizes)} at "
                            f"{input_size} px; accepted: members whose feature maps match (same input size and stride)")
        wrapper = EnsembleWrapper(wrappers)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            input_names=["image"],
            output_names=OUTPUT_NAMES,
            dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    for m in models:
        m.eval()  # the exporter can leave the modules in training mode
    return sha256_file(path)
