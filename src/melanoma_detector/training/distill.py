"""Knowledge distillation from trained runs: the mean logit of one or more teacher models on the
training images becomes a soft target for the model being trained (`--distill-from RUN ...`).

Why: an ensemble of small models scores better than any member, but the bundle has room for
only two of them (50 MB fp32). A student trained towards the ensemble's soft predictions can
carry part of that gain in one model's size.

A teacher is a run folder (or its checkpoint.pt) or a model bundle (`melanoma export`'s folder,
such as the shipped `models/default`): a bundle's ONNX graph gives the logits, so the shipped
ensemble can teach without its members' checkpoints.

The teachers see each training image once, un-augmented, with their own preprocessing; the
student sees augmented views of it. A teacher must never have trained on this run's validation
or test images (or on another image of the same lesion): its soft targets would then carry
what it learnt from them. `check_no_teacher_leak` refuses such a teacher: a run by its split.csv,
a bundle by the fingerprint of its training images, which must be this run's own.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from melanoma_detector.data.discovery import Sample
from melanoma_detector.data.splits import train_fingerprint
from melanoma_detector.errors import UserError
from melanoma_detector.fileio import atomic_path
from melanoma_detector.inference.bundle import is_bundle_path, load_bundle
from melanoma_detector.models.checkpoint import (
    checkpoint_file,
    checkpoint_preprocessing,
    model_from_checkpoint,
    read_checkpoint,
)
from melanoma_detector.training.engine import predict_logits
from melanoma_detector.training.features import cache_key, keeps_global_rng
from melanoma_detector.training.sampling import build_image_loader

log = logging.getLogger(__name__)


def teacher_checkpoint_path(teacher: str | Path) -> Path:
    p = checkpoint_file(teacher)
    if not p.is_file():
        raise UserError(f"--distill-from {teacher}: no checkpoint there (accepted: a run folder of `melanoma train`, "
                        f"its checkpoint.pt, or a model bundle folder of `melanoma export`)")
    return p


def _check_bundle_teacher(teacher: str | Path, train_keys: Sequence[str]) -> None:
    recorded = (load_bundle(teacher, verify=False).metadata.get("training") or {}).get("train_keys_sha256")
    if not recorded:
        raise UserError(f"--distill-from {teacher}: the bundle records no fingerprint of its training images "
                        f"(training.train_keys_sha256), so it cannot be checked that it never trained on this run's "
                        f"val/test images; accepted: a bundle exported from runs on one split, or a run folder")
    if recorded != train_fingerprint(train_keys):
        raise UserError(f"--distill-from {teacher}: the bundle trained on other images than this run's training "
                        f"split, so it may have seen this run's val/test images; accepted: a bundle whose members "
                        f"trained on this run's split (the same --split-file)")


def check_no_teacher_leak(teacher: str | Path, held_out: Sequence[Sample], *, train_keys: Sequence[str] = ()) -> None:
    """Refuse a teacher whose training split holds any of `held_out` (this run's val and test
    images), by image key or by lesion group, or whose val split (the images its epoch was chosen on)
    holds any of this run's test images. A run teacher's split.csv must sit in its run folder;
    a bundle teacher must have trained on exactly `train_keys`, this run's training images."""
    if is_bundle_path(teacher):
        _check_bundle_teacher(teacher, train_keys)
        return
    split_csv = teacher_checkpoint_path(teacher).parent / "split.csv"
    if not split_csv.is_file():
        raise UserError(f"--distill-from {teacher}: no split.csv beside its checkpoint, so it cannot be checked that "
                        f"the teacher never trained on this run's val/test images; give the teacher's run folder")
    keys, groups, chosen_on = set(), set(), set()
    with split_csv.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:  # as split files are written
        for row in csv.DictReader(fh):
            if row.get("split") == "train":
                keys.add(row["key"])
                if row.get("group"):
                    groups.add((row["key"].split("/", 1)[0], row["group"]))
            elif row.get("split") == "val":
                chosen_on.add(row["key"])
    # Keys name images by their data folder: a teacher of another collection is fine, but one trained on a copy
    # of this run's images under another folder name would pass the key check without sharing a single key.
    theirs, ours = {k.split("/", 1)[0] for k in keys}, {s.key.split("/", 1)[0] for s in held_out}
    if keys and ours and not theirs & ours:
        log.warning("--distill-from %s: the teacher trained on data folders %s, none of this run's (%s): the leak "
                    "check can only compare image keys, so make sure those folders hold none of this run's val/test "
                    "images under other names", teacher, ", ".join(sorted(theirs)), ", ".join(sorted(ours)))
    leaked = [s for s in held_out if s.key in keys or (s.group and (s.source, s.group) in groups)]
    # The teacher's epoch was chosen on its val images: this run's test images must not be among them either.
    selected = [s for s in held_out if s.split == "test" and s.key in chosen_on]
    if selected and not leaked:
        raise UserError(f"--distill-from {teacher}: the teacher's epoch was chosen on {len(selected)} of this run's "
                        f"test images (first: {selected[0].key}); distil only from runs trained on the same split "
                        f"(--split-file) or one that keeps this run's test images out of its train and val sets")
    if leaked:
        raise UserError(f"--distill-from {teacher}: the teacher trained on {len(leaked)} of this run's val/test "
                        f"images or their lesions (first: {leaked[0].key}); distil only from runs trained on the same "
                        f"split (--split-file) or one that keeps these images out of its training set")


def _teacher_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


@keeps_global_rng
def teacher_logits(
    teachers: Sequence[str | Path], samples: Sequence[Sample], *, device: torch.device, batch_size: int = 64,
    workers: int = 0, progress: bool = False, cache_dir: Path | None = None,
) -> np.ndarray:
    """Mean raw logit of `teachers` on `samples` (evaluation transform, each teacher's own
    preprocessing; a bundle's through its graph), as float32 of shape (len(samples),). Cached in
    `cache_dir` when given, keyed by the teachers' checkpoint files (a bundle's graph sha256) and
    the samples, so a resumed run or another student of the same teachers does not pay for it
    again (three 192 px teachers: ~13 min on 2 CPU cores)."""
    paths = [Path(t) if is_bundle_path(t) else teacher_checkpoint_path(t) for t in teachers]
    # Loaded (and their graphs hashed against their metadata) once, for the key and the scoring.
    bundles = {p: load_bundle(p) for p in paths if is_bundle_path(p)}
    ids = [f"bundle:{bundles[p].metadata['graph']['sha256']}" if p in bundles else _teacher_id(p) for p in paths]
    # keyed on each image's path, size and time as the feature caches are, not its relative key: another folder
    # of the same name, or files replaced in place, must not be served the old soft targets
    key = cache_key(samples, kind="teacher-logits", teachers=ids)
    cache_file = Path(cache_dir) / f"teacher-logits-{key[:16]}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file) as cached:
            if str(cached["key"]) == key:
                log.info("distillation teachers' logits from %s", cache_file)
                return cached["logits"]
    total = np.zeros(len(samples), np.float64)
    for p in paths:
        if p in bundles:
            from melanoma_detector.inference.predictor import Predictor, run_graph

            total += run_graph(Predictor(bundles[p], threads=torch.get_num_threads()), [s.path for s in samples],
                               batch_size=batch_size, progress=progress, desc=f"teacher {p.name}")["logit"].reshape(-1)
            log.info("distillation teacher: bundle %s: logits of %d training images", p, len(samples))
            continue
        ckpt = read_checkpoint(p)
        model = model_from_checkpoint(ckpt).to(device)
        if device.type in ("cpu", "cuda"):
            model.to(memory_format=torch.channels_last)
        loader = build_image_loader(list(samples), checkpoint_preprocessing(ckpt), batch_size, workers=workers, device=device,
                                    train=False)
        z, _ = predict_logits(model, loader, device=device, progress=progress, desc=f"teacher {p.parent.name}")
        total += z.ravel()
        log.info("distillation teacher %s (%s, best val AUC %s): logits of %d training images", p, ckpt["backbone"],
                 (ckpt.get("best") or {}).get("val_auc"), len(samples))
        del model
    mean = (total / len(paths)).astype(np.float32)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            np.savez(tmp, logits=mean, key=np.array(key))
    return mean
