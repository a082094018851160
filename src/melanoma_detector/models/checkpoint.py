"""Checkpoints: a plain dict (weights + everything needed to use them), saved atomically and
loaded with `torch.load(..., weights_only=True)` so a checkpoint can never run code."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from melanoma_detector.errors import UserError
from melanoma_detector.fileio import atomic_path
from melanoma_detector.models.factory import MelanomaNet, create_model
from melanoma_detector.preprocess import Preprocessing

FORMAT_VERSION = 1


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def checkpoint_file(path: str | Path) -> Path:
    """A run folder's checkpoint.pt, or `path` itself when it is not a folder."""
    p = Path(path)
    return p / "checkpoint.pt" if p.is_dir() else p


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    p = checkpoint_file(path)
    if not p.is_file():
        if (p.parent / "metadata.json").is_file() and (p.parent / "model.onnx").is_file():
            raise UserError(f"{p.parent}: a model bundle, not a checkpoint; accepted here: a .pt file written by "
                            "`melanoma train` or its run folder (`melanoma unbundle` recovers a bundle's checkpoints)")
        raise UserError(f"model checkpoint not found: {p} (expected a .pt file written by `melanoma train` or its run "
                        "folder; commands that serve or evaluate also take a model bundle folder)")
    if not zipfile.is_zipfile(p):  # torch.save writes a zip; torch.load's own error on anything else misleads
        raise UserError(f"{p}: not a checkpoint (not a file written by torch.save); accepted: a .pt file written by "
                        "`melanoma train` or its run folder")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is the user's file
        raise UserError(f"{p}: not a readable melanoma-detector checkpoint ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "preprocessing" not in ckpt:
        raise UserError(f"{p}: not a melanoma-detector checkpoint (missing model_state/preprocessing)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> MelanomaNet:
    try:
        name, mcfg = ckpt["backbone"], ckpt["config"]["model"]
        hidden, dropout = tuple(mcfg["hidden"]), tuple(mcfg["dropout"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"not a melanoma-detector checkpoint: no {exc} in it (backbone and config.model are "
                        "needed)") from None
    model = create_model(name, pretrained=False, hidden=hidden, dropout=dropout)
    own, theirs = model.state_dict(), ckpt["model_state"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    wrong = [k for k in own if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (f"first shape mismatch {wrong[0]} {tuple(theirs[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}"
                 if wrong else f"first: {(missing or unexpected)[0]}")
        raise UserError(f"the checkpoint's weights do not fit backbone {name!r} with its head {hidden}: "
                        f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of another shape ({first})")
    model.load_state_dict(theirs, strict=True)
    return model.eval()


def load_checkpoint(path: str | Path) -> tuple[MelanomaNet, dict[str, Any]]:
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt), ckpt


def checkpoint_preprocessing(ckpt: dict[str, Any]) -> Preprocessing:
    return Preprocessing.from_dict(ckpt["preprocessing"])
