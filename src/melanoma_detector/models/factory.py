"""`create_model`: any timm backbone with the seed notebook's classification head."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from melanoma_detector.errors import UserError
from melanoma_detector.preprocess import Preprocessing

log = logging.getLogger(__name__)


class SeedHead(nn.Module):
    """GAP features -> BatchNorm -> Dense(512, ReLU) -> Dropout(0.45) -> Dense(256, ReLU)
    -> Dropout(0.35) -> Dense(1): the seed's Keras head, returning a logit (sigmoid is applied
    by the loss and by the predictor, after temperature scaling)."""

    def __init__(
        self,
        in_features: int,
        *,
        hidden: Sequence[int] = (512, 256),
        dropout: Sequence[float] = (0.45, 0.35),
    ):
        super().__init__()
        # Keras BatchNormalization defaults: momentum 0.99 (torch: 1 - 0.99), epsilon 1e-3.
        self.norm = nn.BatchNorm1d(in_features, eps=1e-3, momentum=0.01)
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.drop1 = nn.Dropout(dropout[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.drop2 = nn.Dropout(dropout[1])
        self.out = nn.Linear(hidden[1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = self.drop1(torch.relu(self.fc1(x)))
        x = self.drop2(torch.relu(self.fc2(x)))
        return self.out(x).squeeze(-1)

    def l2_parameters(self) -> list[nn.Parameter]:
        """The weights the seed regularised with L2 (the two hidden Dense kernels)."""
        return [self.fc1.weight, self.fc2.weight]


AUX_PREFIX = "aux_head."


class MelanomaNet(nn.Module):
    """Backbone + seed head. With `aux_classes`, a linear layer on the pooled features also
    predicts the diagnosis class while training (training/auxiliary.py); in train mode forward
    then returns (logit, diagnosis logits), in eval mode always the logit alone."""

    def __init__(self, backbone: nn.Module, head: SeedHead, *, aux_classes: int = 0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head: nn.Linear | None = None
        if aux_classes:
            self.aux_head = nn.Linear(backbone.num_features, aux_classes)
            # Zero start: no random gradients reach the pretrained backbone before the layer learns.
            nn.init.zeros_(self.aux_head.weight)
            nn.init.zeros_(self.aux_head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map (B, C, H, W), the layer Grad-CAM explains."""
        return self.backbone.forward_features(x)

    @staticmethod
    def pool(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(self.forward_features(x))
        if self.training and self.aux_head is not None:
            return self.head(pooled), self.aux_head(pooled)
        return self.head(pooled)


def serving_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the training-only auxiliary layer: what checkpoint.pt stores."""
    return {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}


def backbone_units(backbone: nn.Module) -> list[nn.Module] | None:
    """The backbone as an ordered list of modules whose composition is `forward_features`.

    Supported for timm's EfficientNet/MobileNet family and ResNets; None elsewhere (then the
    cached phase 2 is unavailable and freezing falls back to parameter order).
    """
    names = set(dict(backbone.named_children()))
    units: list[nn.Module] | None = None
    if {"conv_stem", "bn1", "blocks"} <= names:
        units = [nn.Sequential(backbone.conv_stem, backbone.bn1)]
        for stage in backbone.blocks:
            units.extend(stage.children() if isinstance(stage, nn.Sequential) else [stage])
        # EfficientNet's conv_head is part of forward_features; MobileNetV3's and GhostNet's run after pooling
        if type(backbone).__name__ == "EfficientNet":
            tail = [m for m in (getattr(backbone, "conv_head", None), getattr(backbone, "bn2", None))
                    if m is not None and not isinstance(m, nn.Identity)]
            if tail:
                units.append(nn.Sequential(*tail))
    elif {"conv1", "bn1", "layer1", "layer4"} <= names:
        units = [nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool)]
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            units.extend(layer.children())
    # The family names are only a guess at the layout: a model that names its parts alike but composes them
    # otherwise would be frozen, cached and trained in the wrong pieces, so the guess is checked.
    return units if units is not None and _composes(backbone, units) else None


def _composes(backbone: nn.Module, units: list[nn.Module]) -> bool:
    """Whether running `units` in order gives `forward_features` (eval mode, a small random input)."""
    modes = {m: m.training for m in backbone.modules()}  # per module: a frozen bottom stays in eval mode
    backbone.eval()
    try:
        first = next(backbone.parameters(), None)
        with torch.no_grad():
            # on the backbone's own device and dtype: a model already moved to the GPU must pass too
            x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            if first is not None:
                x = x.to(device=first.device, dtype=first.dtype)
            y = x
            for unit in units:
                y = unit(y)
            ref = backbone.forward_features(x)
        return y.shape == ref.shape and bool(torch.allclose(y, ref, rtol=1e-4, atol=1e-5))
    except Exception:  # noqa: BLE001 - a layout this guess does not fit
        return False
    finally:
        for m, training in modes.items():
            m.training = training


def split_backbone(backbone: nn.Module, unfreeze_fraction: float) -> tuple[nn.Sequential, nn.Sequential] | None:
    """(frozen bottom, trainable top) with the top holding ceil(fraction * units) units."""
    units = backbone_units(backbone)
    if units is None:
        return None
    n_top = min(len(units), max(0, math.ceil(unfreeze_fraction * len(units))))
    return nn.Sequential(*units[: len(units) - n_top]), nn.Sequential(*units[len(units) - n_top :])


def set_trainable_top(model: MelanomaNet, unfreeze_fraction: float) -> nn.Module | None:
    """Freeze the backbone except its top `unfreeze_fraction`; return the frozen bottom module.

    The frozen bottom is put in eval mode by `train_mode(...)` so its BatchNorm statistics stay
    fixed, as Keras does for non-trainable layers.
    """
    for p in model.backbone.parameters():
        p.requires_grad = False
    parts = split_backbone(model.backbone, unfreeze_fraction)
    if parts is not None:
        bottom, top = parts
        for p in top.parameters():
            p.requires_grad = True
        return bottom
    params = list(model.backbone.parameters())
    for p in params[len(params) - math.ceil(unfreeze_fraction * len(params)) :]:
        p.requires_grad = True
    return None


def apply_drop_path(backbone: nn.Module, rate: float) -> int:
    """Stochastic depth: each residual block's branch is dropped per sample with a probability rising
    linearly from 0 at the first block to `rate` at the last, as timm's `drop_path_rate` does.

    Set after construction, so every weight source (timm, the Lite packages, a file) gets it alike.
    It only acts in train mode, and the frozen bottom is kept in eval mode (`train_mode`), so in
    phase 2 it regularises the trainable top alone. Returns the number of blocks it can drop.
    """
    from timm.layers import DropPath

    # timm's EfficientNet blocks hold an Identity when built without it, its ResNet blocks None.
    blocks = [m for m in backbone.modules()
              if hasattr(m, "drop_path") and (m.drop_path is None or isinstance(m.drop_path, (nn.Identity, DropPath)))]
    # Blocks that change shape have no identity shortcut, so nothing to drop (timm's `has_skip`);
    # they still count in the linear schedule, as in timm.
    residual = [m for m in blocks if getattr(m, "has_skip", True)]
    if not residual:
        raise UserError(f"--drop-path: {type(backbone).__name__} has no residual blocks with a drop path; "
                        "accepted: timm's EfficientNet/MobileNet family and ResNets, or --drop-path 0")
    last = max(len(blocks) - 1, 1)
    for i, block in enumerate(blocks):
        p = rate * i / last
        block.drop_path = DropPath(p) if p > 0 else nn.Identity()
    return len(residual)


def layer_lr_scales(model: MelanomaNet, unfreeze_fraction: float, decay: float) -> dict[int, float]:
    """Layer-wise LR decay: id(parameter) -> decay ** (units between its unit and the top unit).

    The top backbone unit (and the head, which is not listed) keeps the full LR; each unit below it
    trains `decay` times slower than the one above, so the generic low-level filters move least.
    Empty when decay is 1 or the backbone is not made of sequential units (then every LR is equal).
    """
    if decay == 1:
        return {}
    parts = split_backbone(model.backbone, unfreeze_fraction)
    if parts is None:
        return {}
    top_units = list(parts[1])
    return {id(p): decay ** (len(top_units) - 1 - i) for i, unit in enumerate(top_units) for p in unit.parameters()}


def train_mode(model: MelanomaNet, frozen: nn.Module | None) -> None:
    """model.train(), but modules without trainable parameters stay in eval mode."""
    model.train()
    if frozen is not None:
        frozen.eval()
    for m in model.backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters(recurse=False)
        ):
            m.eval()


def check_backbone_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}; any timm model name is accepted (see timm.list_models())")


def create_timm_backbone(name: str, *, pretrained: bool = False, weights_file: str | None = None) -> nn.Module:
    """timm's `name` without classifier or pooling; `weights_file`: its pretrained weights from a local file
    (timm's own loading and key mapping), for a populated Hugging Face cache offline."""
    import timm

    overlay = {"pretrained_cfg_overlay": {"file": weights_file}} if weights_file else {}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="", **overlay)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UserError(f"unknown backbone {name!r}; any timm model name is accepted (see timm.list_models())") from None
        raise


def default_preprocessing(backbone: nn.Module, *, image_size: int | None, resize_mode: str,
                          color_constancy: str = "none") -> Preprocessing:
    """The backbone's pretrained config, optionally at another input size."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    return Preprocessing(
        input_size=size,
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
        resize_mode=resize_mode,
        color_constancy=color_constancy,
    )


def create_model(
    backbone: str = "efficientnet_b3",
    *,
    pretrained: bool = False,
    weights: str | None = None,
    allow_random_init: bool = False,
    hidden: Sequence[int] = (512, 256),
    dropout: Sequence[float] = (0.45, 0.35),
    aux_classes: int = 0,
) -> MelanomaNet:
    """Build `backbone` (any timm name) + the seed head (+ a training-only diagnosis layer with
    `aux_classes` outputs).

    With `pretrained=True` (or `weights`), ImageNet weights come from `models.weights`; when none
    can be had it raises unless `allow_random_init`.
    """
    from melanoma_detector.models.weights import load_pretrained_backbone

    if pretrained or weights:
        net = load_pretrained_backbone(backbone, weights=weights, allow_random_init=allow_random_init)
    else:
        net = create_timm_backbone(backbone, pretrained=False)
    head = SeedHead(net.num_features, hidden=hidden, dropout=dropout)
    return MelanomaNet(net, head, aux_classes=aux_classes)
