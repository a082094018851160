"""The seed's two-phase recipe: phase 1 trains the head on a frozen backbone, phase 2 unfreezes
the top of the backbone. Checkpoint on best validation AUC, early stopping, reduce-LR-on-plateau
and class weights, as in the notebook; everything a consumer needs goes into the checkpoint."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from melanoma_detector import CLASS_NAMES, __version__
from melanoma_detector.config import Config, load_config, save_config
from melanoma_detector.data.dataset import validate_images
from melanoma_detector.data.discovery import Sample, discover_all, require_both_classes
from melanoma_detector.data.splits import apply_split_file, assign_splits, save_split, split_counts
from melanoma_detector.errors import UserError
from melanoma_detector.fileio import atomic_path
from melanoma_detector.models.checkpoint import FORMAT_VERSION, save_checkpoint
from melanoma_detector.models.factory import (
    apply_drop_path,
    check_backbone_name,
    create_model,
    default_preprocessing,
    layer_lr_scales,
    serving_state,
    set_trainable_top,
    split_backbone,
    train_mode,
)
from melanoma_detector.training.auxiliary import DIAGNOSES, AuxDiagnosis, diagnosis_targets
from melanoma_detector.training.distributed import (
    DistInfo,
    broadcast_buffers,
    broadcast_module,
    broadcast_object,
    init_distributed,
    shard_range,
    shutdown,
    sync_batchnorm,
)
from melanoma_detector.training.ema import WeightEma
from melanoma_detector.training.engine import (
    Distillation,
    amp_dtype_for,
    class_weights,
    evaluate,
    flush_denormals,
    predict_logits,
    seed_everything,
    train_one_epoch,
)
from melanoma_detector.training.mixing import BatchMix
from melanoma_detector.training.sampling import EpochSampler, TensorBatches, build_image_loader, set_epoch

log = logging.getLogger(__name__)


def cosine_lr(epoch: int, epochs: int, *, base_lr: float, min_lr: float) -> float:
    """LR for 1-based `epoch` of `epochs`: base_lr at the first, annealed towards min_lr, which the
    epoch after the last would reach."""
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))


class PlateauMonitor:
    """Best-AUC tracking, early stopping and reduce-LR-on-plateau (Keras semantics, mode=max).
    `lr_patience=None` leaves the LR alone (another schedule owns it)."""

    def __init__(self, optimizer, *, patience: int, lr_patience: int | None, factor: float, min_lr: float):
        self.optimizer = optimizer
        self.patience, self.lr_patience = patience, lr_patience
        self.factor, self.min_lr = factor, min_lr
        self.best = -float("inf")
        self.bad_epochs = self.lr_bad_epochs = 0

    def step(self, value: float | None) -> tuple[bool, bool]:
        """Returns (improved, stop)."""
        value = -float("inf") if value is None else value
        if value > self.best + 1e-6:
            self.best, self.bad_epochs, self.lr_bad_epochs = value, 0, 0
            return True, False
        self.bad_epochs += 1
        self.lr_bad_epochs += 1
        if self.lr_patience is not None and self.lr_bad_epochs >= self.lr_patience:
            for g in self.optimizer.param_groups:
                g["lr"] = max(g["lr"] * self.factor, self.min_lr)
            self.lr_bad_epochs = 0
        return False, self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "lr_bad_epochs": self.lr_bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best, self.bad_epochs, self.lr_bad_epochs = state["best"], state["bad_epochs"], state["lr_bad_epochs"]


def _adam(modules_l2: list[nn.Parameter], params: list[nn.Parameter], *, lr: float, l2: float,
          lr_scales: dict[int, float] | None = None):
    """Adam over `params`: Keras' L2 on `modules_l2`, and `lr * lr_scales[id(p)]` where given.

    The unscaled L2 group comes first, so `param_groups[0]` always carries the phase's base LR.
    """
    l2_ids = {id(p) for p in modules_l2}
    lr_scales = lr_scales or {}
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {(2 * l2, 1.0): [], (0.0, 1.0): []}
    for p in params:
        if p.requires_grad:
            # Adam's coupled weight_decay adds wd * w to the gradient: Keras' l2(l2) penalty => wd = 2 * l2.
            key = (2 * l2 if id(p) in l2_ids else 0.0, lr_scales.get(id(p), 1.0))
            buckets.setdefault(key, []).append(p)
    groups = [{"params": ps, "weight_decay": wd, "lr": lr * scale, "lr_scale": scale}
              for (wd, scale), ps in buckets.items() if ps or scale == 1.0]
    try:
        # The fused kernel does Adam's few element-wise passes in one: on a CPU the per-tensor
        # loop of the default implementation costs more than the head's forward and backward.
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups, lr=lr, foreach=True)


def _cores_busy_elsewhere(window: float = 0.3) -> float:
    """CPU cores other processes keep busy right now, from /proc/stat over a short window taken
    while this process is idle (the load average would count this process's own last phase)."""
    import os

    def snapshot():
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + (values[4] if len(values) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = snapshot()
        time.sleep(window)
        t1, i1 = snapshot()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if t1 <= t0:
        return 0.0
    return (1 - (i1 - i0) / (t1 - t0)) * (os.cpu_count() or 1)


class single_thread:
    """Run the head phase on one thread when other processes already keep the cores busy: then
    every thread hand-off of a tiny op waits for a core, and an epoch measured 5x slower on two
    threads than on one. On idle cores, keep all threads (measured ~25% faster)."""

    def __enter__(self):
        import os

        self.threads = torch.get_num_threads()
        busy = _cores_busy_elsewhere() if self.threads > 1 else 0.0
        if busy > max(0.5, (os.cpu_count() or 1) - self.threads + 0.5):
            log.info("head phase on 1 thread: %.1f cores busy elsewhere", busy)
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


class _CachedViews(Dataset):
    """Items from the phase-2 cache: view `epoch % K` of each image (index `epoch * n + i`, as
    `EpochSampler` yields it).

    With `dihedral`, each item's feature map is also flipped / rotated by a multiple of 90
    degrees drawn from (seed, epoch, i). Convolutions commute with these up to their kernels'
    own orientation, so this is a cheap stand-in for fresh image-level flips/rotations between
    the K stored views.
    """

    def __init__(self, cache, labels: np.ndarray, *, dihedral: bool = False, seed: int = 0):
        self.cache, self.labels = cache, labels
        self.dihedral, self.seed = dihedral, seed

    def __len__(self) -> int:
        return self.cache.shape[1]

    def __getitem__(self, index: int):
        epoch, i = divmod(index, len(self))
        fmap = np.asarray(self.cache[epoch % self.cache.shape[0], i], dtype=np.float32)
        if self.dihedral:
            k, flip = np.random.default_rng((self.seed, epoch, i)).integers(0, 4, size=2)
            fmap = np.rot90(fmap, k, axes=(1, 2))
            fmap = np.ascontiguousarray(fmap[:, :, ::-1] if flip % 2 else fmap)
        return torch.from_numpy(fmap), torch.tensor(self.labels[i]), i


class _TopAndHead(nn.Module):
    def __init__(self, top: nn.Module, head: nn.Module):
        super().__init__()
        self.top, self.head = top, head

    def forward(self, x):
        return self.head(self.top(x).mean(dim=(2, 3)))


class RunLogger:
    """Per-epoch metrics CSV (flushed every epoch) and loss/AUC curves."""

    FIELDS = ["phase", "epoch", "global_epoch", "train_loss", "train_auc", "val_loss", "val_auc", "lr", "seconds",
              "train_seconds", "train_images"]

    def __init__(self, out_dir: Path, rows: list[dict[str, Any]] | None = None, *, enabled: bool = True):
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.enabled = enabled

    def add(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k) for k in self.FIELDS}
        row["global_epoch"] = len(self.rows) + 1
        self.rows.append(row)
        if not self.enabled:
            return
        # Rewritten whole, so write a temporary file and rename it: a kill mid-write must not leave
        # an empty metrics.csv behind (the epochs already done would vanish from the run folder).
        with atomic_path(self.out_dir / "metrics.csv") as tmp, tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(self.rows)

    def plot(self) -> None:
        if self.rows and self.enabled:
            from melanoma_detector.evaluation.plots import plot_training_curves

            plot_training_curves(
                [{**r, "epoch": r["global_epoch"]} for r in self.rows], self.out_dir / "curves.png"
            )


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def prepare_samples(config: Config, out_dir: Path, *, progress: bool, write: bool = True) -> dict[str, list[Sample]]:
    sources = discover_all(config.data.paths)
    samples = [s for src in sources for s in src.samples]
    non_images = [p for src in sources for p in src.non_images]
    if config.data.split_file:
        # Checked before the split is applied: a run's split.csv leaves out the images it skipped as unreadable,
        # so resuming it (or reusing its split) must skip them again rather than find them unlisted.
        found = [s.key for s in samples]
        samples, bad = validate_images(
            samples, skip_bad=config.data.skip_bad_images, non_images=non_images, progress=progress
        )
        apply_split_file(samples, config.data.split_file, present=found)
    else:
        samples = assign_splits(
            sources, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction, seed=config.train.seed
        )
        samples, bad = validate_images(
            samples, skip_bad=config.data.skip_bad_images, non_images=non_images, progress=progress
        )
    by_split = {name: [s for s in samples if s.split == name] for name in ("train", "val", "test")}
    require_both_classes(by_split["train"], "training split")
    require_both_classes(by_split["val"], "validation split")
    copies = cross_split_copies(by_split) if write else []
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)  # only once the data passed: a refused run leaves no folder
        save_split(samples, out_dir / "split.csv")
        (out_dir / "data_summary.json").write_text(
            json.dumps({"counts": split_counts(samples), "skipped_bad_images": len(bad), "bad_images": bad[:100],
                        "ignored_non_image_files": len(non_images), "non_image_files": non_images[:100],
                        "val_test_copies_of_train": len(copies), "copies": copies[:100]}, indent=2)
        )
    return by_split


def cross_split_copies(by_split: dict[str, list[Sample]], *, workers: int = 4) -> list[list[str]]:
    """[validation or test image, the training image with the same bytes] pairs, with a warning: collections
    such as the Kaggle melanoma set hold byte-identical copies, and one on both sides makes validation and test
    figures optimistic. Bytes only, which is cheap enough to run on every training run; `melanoma data check`
    also finds resized and re-encoded copies."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    def digest(s: Sample) -> str | None:
        try:
            return hashlib.sha256(Path(s.path).read_bytes()).hexdigest()
        except OSError:
            return None

    with ThreadPoolExecutor(workers) as pool:
        train = {h: s.path for s, h in zip(by_split["train"], pool.map(digest, by_split["train"])) if h}
        held = [s for name in ("val", "test") for s in by_split[name]]
        pairs = [[s.path, train[h]] for s, h in zip(held, pool.map(digest, held)) if h in train]
    if pairs:
        log.warning("%d validation/test image(s) are byte-identical copies of training images, first: %s = %s; "
                    "their figures are optimistic: remove the copies (`melanoma data check` lists them)",
                    len(pairs), *pairs[0])
    return pairs


# ---- crash-safe runs --------------------------------------------------------------------------

RESUME_FILE = "resume.pt"
_STAGES = ("phase1", "phase2", "final", "done")


def _rng_state() -> dict[str, Any]:
    # Plain types and tensors only, so the file loads with torch.load(weights_only=True).
    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, key, *rest = json.loads(state["numpy"])
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _saved_rng(previous: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """This rank's saved random state; rank 0's when the run resumes on another number of processes."""
    return previous["rng"][dist.rank] if previous.get("world_size") == dist.world_size else previous["rng"][0]


def read_resume_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RESUME_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RESUME_FILE}, so nothing to resume (expected a run folder written by `melanoma train`)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's to know about
        raise UserError(f"{path}: unreadable resume state ({str(exc).splitlines()[0][:200]})") from None


class _Run:
    """Where a run stands: the stage, completed epochs of that stage and everything needed to
    continue from there. Rank 0 writes it atomically after every epoch, so `kill -9` at any
    moment loses at most the epoch in progress."""

    def __init__(self, out_dir: Path, dist: DistInfo, previous: dict[str, Any] | None):
        self.out_dir, self.dist = out_dir, dist
        self.prev = previous or {"stage": "phase1", "epoch": 0}

    def stage_done(self, stage: str) -> bool:
        return _STAGES.index(self.prev["stage"]) > _STAGES.index(stage)

    def resumes(self, stage: str) -> bool:
        return self.prev["stage"] == stage and self.prev["epoch"] > 0

    def save(self, **state: Any) -> None:
        rng = [None] * self.dist.world_size
        if self.dist.enabled:
            import torch.distributed as tdist

            tdist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        if self.dist.is_main:
            save_checkpoint({"format_version": FORMAT_VERSION, "world_size": self.dist.world_size, "rng": rng, **state},
                            self.out_dir / RESUME_FILE)


def _resolve_paths(config: Config) -> Config:
    """Absolute data paths in the saved config, so `--resume` works from any folder."""
    data = dataclasses.replace(
        config.data,
        paths=tuple(str(Path(p).resolve()) for p in config.data.paths),
        split_file=str(Path(config.data.split_file).resolve()) if config.data.split_file else None,
    )
    train = dataclasses.replace(config.train, distill_from=tuple(str(Path(p).resolve()) for p in config.train.distill_from))
    return dataclasses.replace(config, data=data, train=train)


def run_training(config: Config | None, out_dir: str | Path, *, progress: bool = True, resume: bool = False,
                 runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train per `config`, writing config, split, metrics, curves and checkpoint to `out_dir`.

    `resume=True` continues the run in `out_dir` from its saved config, split and resume state;
    `runtime` may override options that do not change the result's meaning (device, threads,
    workers). Under torchrun, every rank calls this; only rank 0 writes files."""
    out_dir = Path(out_dir)
    previous = None
    if resume:
        if not (out_dir / "config.yaml").is_file():
            raise UserError(f"{out_dir}: not a run folder (no config.yaml); --resume takes the --out folder of an earlier `melanoma train`")
        if (out_dir / RESUME_FILE).is_file():
            previous = read_resume_state(out_dir)
            if previous["stage"] == "done":
                raise UserError(f"{out_dir}: this run already finished; nothing to resume")
        else:
            log.info("%s: no epoch had finished; starting the run again from its saved config", out_dir)
        config = load_config(out_dir / "config.yaml", runtime or {})
        if (out_dir / "split.csv").is_file():
            config = dataclasses.replace(config, data=dataclasses.replace(config.data, split_file=str(out_dir / "split.csv")))
    elif (out_dir / "checkpoint.pt").exists() or (out_dir / RESUME_FILE).exists():
        raise UserError(f"{out_dir} already holds a trained checkpoint; choose another --out (runs are never "
                        f"overwritten) or continue it with `melanoma train --resume {out_dir}`")
    elif (out_dir / "model.onnx").exists() or (out_dir / "metadata.json").exists():
        raise UserError(f"--out {out_dir}: holds a model bundle; accepted: a new folder for the run (a bundle is "
                        "written from a run by `melanoma export`)")
    if config is None:
        raise UserError("run_training needs a config unless resume=True")
    tc = config.train
    flush_denormals()  # first, so that torch's worker threads inherit it
    if tc.threads:
        torch.set_num_threads(tc.threads)
    dist, device = init_distributed(tc.device)
    try:
        return _train(config, out_dir, dist=dist, device=device, progress=progress and dist.is_main, previous=previous,
                      write_config=not resume)
    finally:
        shutdown(dist)


def _train(config: Config, out_dir: Path, *, dist: DistInfo, device: torch.device, progress: bool,
           previous: dict[str, Any] | None, write_config: bool = True) -> dict[str, Any]:
    main = dist.is_main
    if previous is None:
        config = _resolve_paths(config)
    tc, mc = config.train, config.model
    seed_everything(tc.seed)
    check_backbone_name(mc.backbone)
    splits = prepare_samples(config, out_dir, progress=progress, write=main and previous is None)
    # Written once the data has been read and split: a run refused for its data leaves no config.yaml behind. A
    # resumed run keeps the config.yaml it was started with (resume points this process at the run's own
    # split.csv, which must not leak into the file a later `--config RUN/config.yaml` repeats).
    if previous is None and main and write_config:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
    train_s, val_s = splits["train"], splits["val"]
    if main:
        log.info("data: train %d, val %d, test %d images; device %s; %d process(es)",
                 len(train_s), len(val_s), len(splits["test"]), device, dist.world_size)

    model = create_model(
        mc.backbone, pretrained=mc.pretrained and previous is None, weights=mc.weights if previous is None else None,
        allow_random_init=mc.allow_random_init or previous is not None, hidden=mc.hidden, dropout=mc.dropout,
        aux_classes=len(DIAGNOSES) if tc.aux_diagnosis_weight > 0 else 0,
    )
    if tc.drop_path > 0:
        n_blocks = apply_drop_path(model.backbone, tc.drop_path)
        log.info("stochastic depth: %d residual blocks, drop rate rising to %.2f", n_blocks, tc.drop_path)
    pp = default_preprocessing(model.backbone, image_size=mc.image_size, resize_mode=mc.resize_mode,
                               color_constancy=mc.color_constancy)
    broadcast_module(model, dist)  # every rank starts from rank 0's weights, random-init ones included
    seed_everything(tc.seed + dist.rank)  # then distinct dropout masks per rank; data order is seeded apart
    run = _Run(out_dir, dist, previous)
    if previous is not None:
        model.load_state_dict(previous["model_state"])
        log.info("resuming %s after %s epoch %d", out_dir, previous["stage"], previous["epoch"])
    if dist.enabled:
        model = sync_batchnorm(model, device)
    model.to(device)
    amp_dtype = amp_dtype_for(tc.amp, device)
    # channels_last suits oneDNN as well as cuDNN: on a 2-core CPU a plain phase-2 step is ~1.45x
    # faster (benchmarks/train_speed.py --memory-format).
    channels_last = device.type in ("cuda", "cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    cw = class_weights(s.label for s in train_s) if tc.class_weights else None
    y_train = np.array([s.label for s in train_s], np.float32)
    v0, v1 = shard_range(len(val_s), dist)
    y_val = np.array([s.label for s in val_s], np.float32)
    cache_dir = Path(tc.cache_dir) if tc.cache_dir else None
    if cache_dir is None:
        from melanoma_detector.training.features import default_cache_dir

        cache_dir = default_cache_dir()
    runlog = RunLogger(out_dir, previous["history"] if previous else None, enabled=main)
    if previous is not None:
        best = dict(previous["best"])
    else:
        best = {"auc": -float("inf"), "state": copy.deepcopy(model.state_dict()), "phase": None, "epoch": 0}
    loader_kw = dict(workers=config.data.num_workers, device=device, dist=dist)
    distill = None
    if tc.distill_from:
        from melanoma_detector.training.distill import check_no_teacher_leak, teacher_logits

        for teacher in tc.distill_from:
            check_no_teacher_leak(teacher, [*val_s, *splits["test"]], train_keys=[s.key for s in train_s])
        # Rank 0 computes (or reads from the cache) and shares: the teachers' passes run once.
        z_teacher = broadcast_object(
            teacher_logits(tc.distill_from, train_s, device=device, batch_size=64, workers=config.data.num_workers,
                           progress=progress, cache_dir=cache_dir) if main else None, dist)
        if main and len(set(y_train.tolist())) == 2:
            from sklearn.metrics import roc_auc_score

            log.info("distilling from %d teacher(s) (weight %g, temperature %g); their AUC on the training images %.3f",
                     len(tc.distill_from), tc.distill_weight, tc.distill_temperature, roc_auc_score(y_train, z_teacher))
        distill = Distillation(torch.from_numpy(z_teacher), weight=tc.distill_weight, temperature=tc.distill_temperature)

    aux = None
    if tc.aux_diagnosis_weight > 0:
        dx = diagnosis_targets(train_s)
        if not (dx[y_train == 0] >= 0).any():
            raise UserError("--aux-diagnosis-weight needs diagnoses: no benign training image has a `dx` in its "
                            "labels.csv (accepted: " + ", ".join(DIAGNOSES) + " and ISIC 2017's names)")
        if main:
            counts = {d: int((dx == i).sum()) for i, d in enumerate(DIAGNOSES)}
            log.info("auxiliary diagnosis target (weight %g) on %d of %d training images: %s", tc.aux_diagnosis_weight,
                     int((dx >= 0).sum()), len(dx), counts)
        aux = AuxDiagnosis(torch.from_numpy(dx), weight=tc.aux_diagnosis_weight)

    def base_ckpt() -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "backbone": mc.backbone,
            "config": config.to_dict(),
            "class_names": list(CLASS_NAMES),
            "preprocessing": pp.to_dict(),
            "history": runlog.rows,
        }

    def wrap(module: nn.Module) -> nn.Module:
        if tc.compile:
            module = torch.compile(module)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        return module

    def run_phase(phase, module, optimizer, train_loader, val_loader, epochs, set_mode, mix=None):
        monitor = PlateauMonitor(
            optimizer, patience=tc.early_stopping_patience,
            lr_patience=tc.reduce_lr_patience if tc.lr_schedule == "plateau" else None,
            factor=tc.reduce_lr_factor, min_lr=tc.min_lr,
        )
        base_lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0)
        first = 1
        if previous is not None and previous["stage"] == phase:
            # Also when the stage had started but no epoch of it ended (killed right after the
            # previous stage): dropout must continue from the interrupted run's random state.
            _set_rng_state(_saved_rng(previous, dist))
        if run.resumes(phase):
            optimizer.load_state_dict(previous["optimizer_state"])
            monitor.load_state_dict(previous["monitor"])
            first = previous["epoch"] + 1
            if previous.get("stopped"):
                first = epochs + 1
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        ema = None
        if phase == "phase2" and tc.ema_decay > 0:
            ema = WeightEma(model, decay=tc.ema_decay)
            if run.resumes(phase) and previous.get("ema") is not None:
                ema.load_state_dict(previous["ema"])
        trained = wrap(module)
        phase_offset = 1000 * _STAGES.index(phase)  # fresh augmentation seeds per phase
        for epoch in range(first, epochs + 1):
            if tc.lr_schedule == "cosine":
                for g in optimizer.param_groups:
                    g["lr"] = cosine_lr(epoch, epochs, base_lr=base_lr, min_lr=tc.min_lr) * g.get("lr_scale", 1.0)
            set_epoch(train_loader, phase_offset + epoch)
            t0 = time.perf_counter()
            tr = train_one_epoch(
                trained, train_loader, optimizer, device=device, class_w=cw, set_train_mode=set_mode,
                max_steps=tc.max_steps_per_epoch, progress=progress, desc=f"{phase} {epoch}/{epochs}",
                amp_dtype=amp_dtype, scaler=scaler, channels_last=channels_last, dist=dist, distill=distill, aux=aux,
                ema=ema, mix=mix, rank_weight=tc.rank_weight,
            )
            train_seconds = time.perf_counter() - t0
            # every rank validates (and keeps) rank 0's model, BatchNorm statistics and EMA included
            broadcast_buffers([*module.buffers(), *(ema.shadow.values() if ema is not None else ())], dist)
            # With EMA, the averaged weights are the ones validated, kept and shipped.
            with ema.applied() if ema is not None else contextlib.nullcontext():
                va = evaluate(module, val_loader, device=device, class_w=cw, amp_dtype=amp_dtype, dist=dist)
            lr = optimizer.param_groups[0]["lr"]
            if tr["n"] == 0:
                raise UserError(f"{phase} epoch {epoch}: no training image was used (every batch held one image, "
                                "which BatchNorm cannot train on); accepted: train.batch_size >= 2")
            improved, stop = monitor.step(va["auc"])
            # the checkpoint changes only on a gain over every earlier epoch, phase 1 included ("*" marks that)
            new_best = improved and (va["auc"] or -1) > best["auc"]
            seconds = time.perf_counter() - t0
            runlog.add({
                "phase": phase, "epoch": epoch, "train_loss": tr["loss"], "train_auc": tr.get("auc"),
                "val_loss": va["loss"], "val_auc": va["auc"], "lr": lr, "seconds": seconds,
                "train_seconds": train_seconds, "train_images": tr["n"],
            })
            if main:
                print(
                    f"{phase} epoch {epoch}/{epochs}: loss {tr['loss']:.4f} val_loss {va['loss']:.4f} "
                    f"val_auc{' (EMA)' if ema is not None else ''} {_fmt(va['auc'])}{' *' if new_best else ''} ({seconds:.1f}s)",
                    flush=True,
                )
            if new_best:
                best.update(auc=va["auc"], state=copy.deepcopy(ema.shadow if ema is not None else model.state_dict()), phase=phase, epoch=epoch)
                if main:
                    save_checkpoint({**base_ckpt(), "model_state": serving_state(best["state"]),
                                     "best": {"phase": phase, "epoch": epoch, "val_auc": va["auc"]}}, out_dir / "checkpoint.pt")
            if stop and main:
                print(f"{phase}: early stopping after {epoch} epochs (no val AUC gain in {tc.early_stopping_patience})", flush=True)
            run.save(stage=phase, epoch=epoch, stopped=stop, model_state=model.state_dict(),
                     optimizer_state=optimizer.state_dict(), monitor=monitor.state_dict(), best=best, history=runlog.rows,
                     ema=ema.state_dict() if ema is not None else None)
            if stop:
                break
        return monitor.best

    def finish_stage(stage: str) -> None:
        """Record that `stage` is over (with the weights the next stage starts from)."""
        nxt = _STAGES[_STAGES.index(stage) + 1]
        run.prev = {"stage": nxt, "epoch": 0}
        run.save(stage=nxt, epoch=0, model_state=model.state_dict(), best=best, history=runlog.rows)

    # ---- phase 1: frozen backbone, train the head --------------------------------------------
    for p in model.backbone.parameters():
        p.requires_grad = False
    if tc.epochs_frozen > 0 and not run.stage_done("phase1"):
        l2_params = model.head.l2_parameters()
        opt = _adam(l2_params, list(model.head.parameters()), lr=tc.lr_frozen, l2=tc.l2)
        if tc.feature_cache:
            from melanoma_detector.training.features import module_fingerprint, pooled_features

            fp = module_fingerprint(model.backbone)
            kw = dict(device=device, cache_dir=cache_dir, batch_size=tc.batch_size, workers=config.data.num_workers,
                      flip_average=tc.flip_average, progress=progress, fingerprint=fp, dist=dist, amp_dtype=amp_dtype,
                      engine=tc.feature_engine)
            f_train = pooled_features(model.backbone, train_s, pp, **kw)
            f_val = pooled_features(model.backbone, val_s, pp, **kw)
            tl = TensorBatches(torch.from_numpy(f_train).to(device), torch.from_numpy(y_train).to(device),
                               batch_size=tc.batch_size, shuffle=True, seed=tc.seed, info=dist)
            vl = TensorBatches(torch.from_numpy(f_val[v0:v1]).to(device), torch.from_numpy(y_val[v0:v1]).to(device),
                               batch_size=1024, shuffle=False)
            with single_thread():
                run_phase("phase1", model.head, opt, tl, vl, tc.epochs_frozen, model.head.train)
        else:
            tl = build_image_loader(train_s, pp, tc.batch_size, train=True, seed=tc.seed, augmentation=tc.augmentation, **loader_kw)
            vl = build_image_loader(val_s[v0:v1], pp, tc.batch_size, train=False, **loader_kw)
            run_phase("phase1", model, opt, tl, vl, tc.epochs_frozen, lambda: (model.train(), model.backbone.eval()))
        model.load_state_dict(best["state"])
        finish_stage("phase1")

    # ---- phase 2: unfreeze the top of the backbone -------------------------------------------
    mode = tc.phase2_mode
    if mode == "auto":
        # Plain everywhere: on the full data the cached mode memorises its K stored views within
        # two epochs (best val AUC 0.862) while plain phase 2 kept improving for 14 (0.898); see
        # docs/model-development.md. Cached stays for quick experiments (an epoch is ~6x cheaper).
        mode = "plain"
    if tc.epochs_finetune > 0 and not run.stage_done("phase2"):
        frozen = set_trainable_top(model, tc.unfreeze_fraction)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = _adam(model.head.l2_parameters(), trainable, lr=tc.lr_finetune, l2=tc.l2,
                    lr_scales=layer_lr_scales(model, tc.unfreeze_fraction, tc.layer_decay))
        parts = split_backbone(model.backbone, tc.unfreeze_fraction)
        if tc.layer_decay != 1 and parts is None:
            log.warning("--layer-decay needs a backbone made of sequential blocks; %s is not: one LR for all", mc.backbone)
        if mode == "cached" and parts is None:
            log.warning("cached phase 2 needs a backbone made of sequential blocks; %s is not: using plain", mc.backbone)
            mode = "plain"
        if mode == "cached" and aux is not None:
            log.warning("the auxiliary diagnosis target trains in the plain phase 2 only; the cached phase 2 ignores it")
        if mode == "cached" and tc.mix != "none":
            log.warning("--mix blends whole images, in the plain phase 2 only; the cached phase 2 ignores it")
        if mode == "cached":
            from melanoma_detector.training.features import bottom_feature_cache, module_fingerprint

            bottom, top = parts
            fp = module_fingerprint(bottom)
            kw = dict(device=device, cache_dir=cache_dir, seed=tc.seed, batch_size=tc.batch_size,
                      workers=config.data.num_workers, progress=progress, fingerprint=fp, dist=dist,
                      engine=tc.feature_engine)
            c_train = bottom_feature_cache(bottom, train_s, pp, views=tc.cache_views, train=True,
                                           augmentation=tc.augmentation, **kw)
            c_val = bottom_feature_cache(bottom, val_s, pp, views=1, train=False, **kw)
            ds = _CachedViews(c_train, y_train, dihedral=tc.cache_dihedral, seed=tc.seed)
            tl = DataLoader(ds, batch_size=tc.batch_size, sampler=EpochSampler(len(ds), dist, seed=tc.seed + 1))
            vl = DataLoader(Subset(_CachedViews(c_val, y_val), range(v0, v1)), batch_size=64)
            module = _TopAndHead(top, model.head)
            run_phase("phase2", module, opt, tl, vl, tc.epochs_finetune, lambda: train_mode(model, frozen))
        else:
            tl = build_image_loader(train_s, pp, tc.batch_size, train=True, seed=tc.seed + 1, augmentation=tc.augmentation,
                                    **loader_kw)
            vl = build_image_loader(val_s[v0:v1], pp, tc.batch_size, train=False, **loader_kw)
            mix = BatchMix(tc.mix, alpha=tc.mix_alpha, prob=tc.mix_prob) if tc.mix != "none" else None
            run_phase("phase2", model, opt, tl, vl, tc.epochs_finetune, lambda: train_mode(model, frozen), mix=mix)
        for p in model.parameters():
            p.requires_grad = True
        finish_stage("phase2")

    # ---- final: best weights, calibration and operating points on validation (rank 0) -------
    model.load_state_dict(best["state"])
    model.eval()
    summary = None
    if main:
        summary = _finalize(model, best, base_ckpt(), splits, pp, config, out_dir, device=device, progress=progress)
        runlog.plot()
    run.save(stage="done", epoch=0, best={k: v for k, v in best.items() if k != "state"}, history=runlog.rows)
    return broadcast_object(summary, dist)


def _finalize(model, best, base, splits, pp, config, out_dir, *, device, progress) -> dict[str, Any]:
    from melanoma_detector.evaluation.metrics import (
        apply_calibration,
        binary_metrics,
        fit_operating_points,
        with_margin,
    )

    workers = config.data.num_workers

    def logits_of(samples, desc):
        loader = build_image_loader(samples, pp, 64, workers=workers, device=device, train=False)
        # float32, not the training autocast: the thresholds are calibrated probabilities of single images,
        # so they must be fitted on the logits the checkpoint serves (TorchPredictor and export run in fp32).
        return predict_logits(model, loader, device=device, progress=progress, desc=desc)

    val_logits, val_y = logits_of(splits["val"], "final val")
    temperature, logit_bias, thresholds = fit_operating_points(val_logits, val_y)
    # A torch model's float32 logits change in the last bits with batch size and memory layout (up to ~2e-6 in
    # probability between this pass and TorchPredictor's), so a threshold sitting exactly on a boundary image
    # could drop it when served. A relative 1e-5 below keeps it on its side, but never past the next score below:
    # the high-specificity threshold sits just above a negative, which must stay negative. (A bundle needs no
    # margin: export fits on the very graph it serves, and its outputs do not depend on the batch.)
    p_val = apply_calibration(val_logits, temperature, logit_bias)
    thresholds = {k: with_margin(v, p_val) for k, v in thresholds.items()}
    metrics = {"val": binary_metrics(val_y, p_val, threshold=thresholds["screening"])}
    if splits["test"] and len({s.label for s in splits["test"]}) == 2:
        tl_, ty = logits_of(splits["test"], "final test")
        metrics["test"] = binary_metrics(ty, apply_calibration(tl_, temperature, logit_bias), threshold=thresholds["screening"])
    best_info = {"phase": best["phase"], "epoch": best["epoch"], "val_auc": best["auc"] if best["auc"] > -1 else None}
    ckpt = {
        **base,
        "model_state": serving_state(best["state"]),
        "best": best_info,
        "temperature": temperature,
        "logit_bias": logit_bias,
        "thresholds": thresholds,
        "metrics": metrics,
    }
    save_checkpoint(ckpt, out_dir / "checkpoint.pt")
    (out_dir / "metrics.json").write_text(json.dumps({"best": best_info, "temperature": temperature, "logit_bias": logit_bias, "thresholds": thresholds, **metrics}, indent=2))
    return {"out_dir": str(out_dir), "best": best_info, "metrics": metrics, "thresholds": thresholds, "temperature": temperature}
