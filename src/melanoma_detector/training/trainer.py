"""The seed's two-phase recipe: phase 1 trains the head on a frozen backbone, phase 2 unfreezes
the top of the backbone. Checkpoint on best validation AUC, early stopping, reduce-LR-on-plateau
and class weights, as in the notebook; everything a consumer needs goes into the checkpoint."""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from melanoma_detector import CLASS_NAMES, __version__
from melanoma_detector.config import Config, save_config
from melanoma_detector.data.dataset import ImageDataset, validate_images
from melanoma_detector.data.discovery import Sample, discover_all, require_both_classes
from melanoma_detector.data.splits import apply_split_file, assign_splits, save_split, split_counts
from melanoma_detector.data.transforms import build_transforms
from melanoma_detector.errors import UserError
from melanoma_detector.models.checkpoint import FORMAT_VERSION, save_checkpoint
from melanoma_detector.models.factory import (
    MelanomaNet,
    check_backbone_name,
    create_model,
    default_preprocessing,
    set_trainable_top,
    split_backbone,
    train_mode,
)
from melanoma_detector.training.engine import (
    class_weights,
    evaluate,
    predict_logits,
    resolve_device,
    seed_everything,
    train_one_epoch,
)

log = logging.getLogger(__name__)


class PlateauMonitor:
    """Best-AUC tracking, early stopping and reduce-LR-on-plateau (Keras semantics, mode=max)."""

    def __init__(self, optimizer, *, patience: int, lr_patience: int, factor: float, min_lr: float):
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
        if self.lr_bad_epochs >= self.lr_patience:
            for g in self.optimizer.param_groups:
                g["lr"] = max(g["lr"] * self.factor, self.min_lr)
            self.lr_bad_epochs = 0
        return False, self.bad_epochs >= self.patience


def _adam(modules_l2: list[nn.Parameter], params: list[nn.Parameter], *, lr: float, l2: float):
    l2_ids = {id(p) for p in modules_l2}
    decay = [p for p in params if id(p) in l2_ids and p.requires_grad]
    rest = [p for p in params if id(p) not in l2_ids and p.requires_grad]
    # Adam's coupled weight_decay adds wd * w to the gradient: Keras' l2(l2) penalty => wd = 2 * l2.
    groups = [{"params": decay, "weight_decay": 2 * l2}, {"params": rest, "weight_decay": 0.0}]
    try:
        # The fused kernel does Adam's few element-wise passes in one: on a CPU the per-tensor
        # loop of the default implementation costs more than the head's forward and backward.
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups, lr=lr, foreach=True)


class TensorBatches:
    """Shuffled mini-batches straight from in-memory tensors: for the head phase, where a
    DataLoader's per-item indexing and collation cost more than the head's own step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self):
        idx = torch.randperm(len(self.x), generator=self.generator) if self.shuffle else torch.arange(len(self.x))
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            yield self.x[j], self.y[j], j


class single_thread:
    """Run the head phase on one thread when other processes already keep the cores busy: then
    every thread hand-off of a tiny op waits for a core, and an epoch measured 5x slower on two
    threads than on one. On idle cores, keep all threads (measured ~20% faster)."""

    def __enter__(self):
        import os

        self.threads = torch.get_num_threads()
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if busy > max(1.0, (os.cpu_count() or 1) - 0.5):
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


class _CachedViews(Dataset):
    """Items from the phase-2 cache: view `epoch % K` of each image.

    With `dihedral`, each item's feature map is also flipped / rotated by a random multiple of 90
    degrees. Convolutions commute with these up to their kernels' own orientation, so this is a
    cheap stand-in for fresh image-level flips/rotations between the K stored views.
    """

    def __init__(self, cache: np.ndarray, labels: np.ndarray, *, dihedral: bool = False, seed: int = 0):
        self.cache, self.labels, self.view = cache, labels, 0
        self.dihedral = dihedral
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.cache.shape[1]

    def __getitem__(self, i: int):
        fmap = np.asarray(self.cache[self.view, i], dtype=np.float32)
        if self.dihedral:
            k, flip = self.rng.integers(4), self.rng.integers(2)
            fmap = np.rot90(fmap, k, axes=(1, 2))
            fmap = np.ascontiguousarray(fmap[:, :, ::-1] if flip else fmap)
        return torch.from_numpy(fmap), torch.tensor(self.labels[i]), i


class _TopAndHead(nn.Module):
    def __init__(self, top: nn.Module, head: nn.Module):
        super().__init__()
        self.top, self.head = top, head

    def forward(self, x):
        return self.head(self.top(x).mean(dim=(2, 3)))


class RunLogger:
    """Per-epoch metrics CSV (flushed every epoch) and loss/AUC curves."""

    FIELDS = ["phase", "epoch", "global_epoch", "train_loss", "train_auc", "val_loss", "val_auc", "lr", "seconds"]

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k) for k in self.FIELDS}
        row["global_epoch"] = len(self.rows) + 1
        self.rows.append(row)
        with (self.out_dir / "metrics.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(self.rows)

    def plot(self) -> None:
        if self.rows:
            from melanoma_detector.evaluation.plots import plot_training_curves

            plot_training_curves(
                [{**r, "epoch": r["global_epoch"]} for r in self.rows], self.out_dir / "curves.png"
            )


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def prepare_samples(config: Config, out_dir: Path, *, progress: bool) -> dict[str, list[Sample]]:
    sources = discover_all(config.data.paths)
    samples = [s for src in sources for s in src.samples]
    if config.data.split_file:
        apply_split_file(samples, config.data.split_file)
    else:
        samples = assign_splits(
            sources, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction, seed=config.train.seed
        )
    non_images = [p for src in sources for p in src.non_images]
    samples, bad = validate_images(
        samples, skip_bad=config.data.skip_bad_images, non_images=non_images, progress=progress
    )
    save_split(samples, out_dir / "split.csv")
    by_split = {name: [s for s in samples if s.split == name] for name in ("train", "val", "test")}
    require_both_classes(by_split["train"], "training split")
    require_both_classes(by_split["val"], "validation split")
    (out_dir / "data_summary.json").write_text(
        json.dumps({"counts": split_counts(samples), "skipped_bad_images": len(bad), "bad_images": bad[:100]}, indent=2)
    )
    return by_split


def run_training(config: Config, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train per `config`, writing config, split, metrics, curves and checkpoint to `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / "checkpoint.pt").exists():
        raise UserError(f"{out_dir} already holds a trained checkpoint; choose another --out (runs are never overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tc, mc = config.train, config.model
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    save_config(config, out_dir / "config.yaml")
    device = resolve_device(tc.device)
    check_backbone_name(mc.backbone)
    splits = prepare_samples(config, out_dir, progress=progress)
    train_s, val_s = splits["train"], splits["val"]
    log.info("data: train %d, val %d, test %d images; device %s", len(train_s), len(val_s), len(splits["test"]), device)

    model = create_model(
        mc.backbone, pretrained=mc.pretrained, weights=mc.weights, allow_random_init=mc.allow_random_init,
        hidden=mc.hidden, dropout=mc.dropout,
    )
    pp = default_preprocessing(model.backbone, image_size=mc.image_size, resize_mode=mc.resize_mode)
    model.to(device)
    cw = class_weights(s.label for s in train_s) if tc.class_weights else None
    y_train = np.array([s.label for s in train_s], np.float32)
    y_val = np.array([s.label for s in val_s], np.float32)
    cache_dir = Path(tc.cache_dir) if tc.cache_dir else None
    if cache_dir is None:
        from melanoma_detector.training.features import default_cache_dir

        cache_dir = default_cache_dir()
    runlog = RunLogger(out_dir)
    best = {"auc": -float("inf"), "state": copy.deepcopy(model.state_dict()), "phase": None, "epoch": 0}

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

    def run_phase(phase, module, optimizer, train_loader, val_loader, epochs, set_mode, before_epoch=None):
        monitor = PlateauMonitor(
            optimizer, patience=tc.early_stopping_patience, lr_patience=tc.reduce_lr_patience,
            factor=tc.reduce_lr_factor, min_lr=tc.min_lr,
        )
        for epoch in range(1, epochs + 1):
            if before_epoch:
                before_epoch(epoch)
            t0 = time.perf_counter()
            tr = train_one_epoch(
                module, train_loader, optimizer, device=device, class_w=cw, set_train_mode=set_mode,
                max_steps=tc.max_steps_per_epoch, progress=progress, desc=f"{phase} {epoch}/{epochs}",
            )
            va = evaluate(module, val_loader, device=device, class_w=cw)
            lr = optimizer.param_groups[0]["lr"]
            improved, stop = monitor.step(va["auc"])
            runlog.add({
                "phase": phase, "epoch": epoch, "train_loss": tr["loss"], "train_auc": tr.get("auc"),
                "val_loss": va["loss"], "val_auc": va["auc"], "lr": lr, "seconds": time.perf_counter() - t0,
            })
            print(
                f"{phase} epoch {epoch}/{epochs}: loss {tr['loss']:.4f} val_loss {va['loss']:.4f} "
                f"val_auc {_fmt(va['auc'])}{' *' if improved else ''} ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
            if improved and (va["auc"] or -1) > best["auc"]:
                best.update(auc=va["auc"], state=copy.deepcopy(model.state_dict()), phase=phase, epoch=epoch)
                save_checkpoint({**base_ckpt(), "model_state": best["state"], "best": {"phase": phase, "epoch": epoch, "val_auc": va["auc"]}}, out_dir / "checkpoint.pt")
            if stop:
                print(f"{phase}: early stopping after {epoch} epochs (no val AUC gain in {tc.early_stopping_patience})", flush=True)
                break
        return monitor.best

    # ---- phase 1: frozen backbone, train the head --------------------------------------------
    for p in model.backbone.parameters():
        p.requires_grad = False
    if tc.epochs_frozen > 0:
        l2_params = model.head.l2_parameters()
        if tc.feature_cache:
            from melanoma_detector.training.features import module_fingerprint, pooled_features

            fp = module_fingerprint(model.backbone)
            kw = dict(device=device, cache_dir=cache_dir, batch_size=tc.batch_size, workers=config.data.num_workers,
                      flip_average=tc.flip_average, progress=progress, fingerprint=fp)
            f_train = pooled_features(model.backbone, train_s, pp, **kw)
            f_val = pooled_features(model.backbone, val_s, pp, **kw)
            tl = TensorBatches(torch.from_numpy(f_train), torch.from_numpy(y_train), batch_size=tc.batch_size,
                               shuffle=True, seed=tc.seed)
            vl = TensorBatches(torch.from_numpy(f_val), torch.from_numpy(y_val), batch_size=1024, shuffle=False)
            opt = _adam(l2_params, list(model.head.parameters()), lr=tc.lr_frozen, l2=tc.l2)
            with single_thread():
                run_phase("phase1", model.head, opt, tl, vl, tc.epochs_frozen, model.head.train)
        else:
            tl = _image_loader(train_s, pp, tc.batch_size, config.data.num_workers, train=True, seed=tc.seed)
            vl = _image_loader(val_s, pp, tc.batch_size, config.data.num_workers, train=False)
            opt = _adam(l2_params, list(model.head.parameters()), lr=tc.lr_frozen, l2=tc.l2)
            run_phase("phase1", model, opt, tl, vl, tc.epochs_frozen, lambda: (model.train(), model.backbone.eval()))
        model.load_state_dict(best["state"])

    # ---- phase 2: unfreeze the top of the backbone -------------------------------------------
    mode = tc.phase2_mode
    if mode == "auto":
        mode = "plain" if device.type == "cuda" else "cached"
    if tc.epochs_finetune > 0:
        frozen = set_trainable_top(model, tc.unfreeze_fraction)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = _adam(model.head.l2_parameters(), trainable, lr=tc.lr_finetune, l2=tc.l2)
        parts = split_backbone(model.backbone, tc.unfreeze_fraction)
        if mode == "cached" and parts is None:
            log.warning("cached phase 2 needs a backbone made of sequential blocks; %s is not: using plain", mc.backbone)
            mode = "plain"
        if mode == "cached":
            from melanoma_detector.training.features import bottom_feature_cache, module_fingerprint

            bottom, top = parts
            fp = module_fingerprint(bottom)
            kw = dict(device=device, cache_dir=cache_dir, seed=tc.seed, batch_size=tc.batch_size,
                      workers=config.data.num_workers, progress=progress, fingerprint=fp)
            c_train = bottom_feature_cache(bottom, train_s, pp, views=tc.cache_views, train=True, **kw)
            c_val = bottom_feature_cache(bottom, val_s, pp, views=1, train=False, **kw)
            ds = _CachedViews(c_train, y_train, dihedral=tc.cache_dihedral, seed=tc.seed)
            g = torch.Generator().manual_seed(tc.seed + 1)
            tl = DataLoader(ds, batch_size=tc.batch_size, shuffle=True, generator=g)
            vl = DataLoader(_CachedViews(c_val, y_val), batch_size=64)
            module = _TopAndHead(top, model.head)

            def set_mode():
                train_mode(model, frozen)

            def pick_view(epoch: int):
                ds.view = (epoch - 1) % c_train.shape[0]

            run_phase("phase2", module, opt, tl, vl, tc.epochs_finetune, set_mode, pick_view)
        else:
            tl = _image_loader(train_s, pp, tc.batch_size, config.data.num_workers, train=True, seed=tc.seed + 1)
            vl = _image_loader(val_s, pp, tc.batch_size, config.data.num_workers, train=False)
            run_phase("phase2", model, opt, tl, vl, tc.epochs_finetune, lambda: train_mode(model, frozen))
        for p in model.parameters():
            p.requires_grad = True

    # ---- final: best weights, calibration and operating points on validation -----------------
    model.load_state_dict(best["state"])
    model.eval()
    from melanoma_detector.evaluation.metrics import (
        apply_calibration,
        binary_metrics,
        fit_temperature_bias,
        threshold_for_sensitivity,
        threshold_for_specificity,
    )

    val_logits, val_y = predict_logits(model, _image_loader(val_s, pp, 64, config.data.num_workers, train=False), device=device, progress=progress, desc="final val")
    temperature, logit_bias = fit_temperature_bias(val_logits, val_y)
    p_val = apply_calibration(val_logits, temperature, logit_bias)
    thresholds = {
        "screening": float(threshold_for_sensitivity(val_y, p_val, 0.95)),
        "high_specificity": float(threshold_for_specificity(val_y, p_val, 0.90)),
    }
    metrics = {"val": binary_metrics(val_y, p_val, threshold=thresholds["screening"])}
    if splits["test"] and len({s.label for s in splits["test"]}) == 2:
        tl_, ty = predict_logits(model, _image_loader(splits["test"], pp, 64, config.data.num_workers, train=False), device=device, progress=progress, desc="final test")
        metrics["test"] = binary_metrics(ty, apply_calibration(tl_, temperature, logit_bias), threshold=thresholds["screening"])
    ckpt = {
        **base_ckpt(),
        "model_state": best["state"],
        "best": {"phase": best["phase"], "epoch": best["epoch"], "val_auc": best["auc"] if best["auc"] > -1 else None},
        "temperature": temperature,
        "logit_bias": logit_bias,
        "thresholds": thresholds,
        "metrics": metrics,
    }
    save_checkpoint(ckpt, out_dir / "checkpoint.pt")
    (out_dir / "metrics.json").write_text(json.dumps({"best": ckpt["best"], "temperature": temperature, "logit_bias": logit_bias, "thresholds": thresholds, **metrics}, indent=2))
    runlog.plot()
    summary = {"out_dir": str(out_dir), "best": ckpt["best"], "metrics": metrics, "thresholds": thresholds, "temperature": temperature}
    return summary


def _image_loader(samples, pp, batch_size, workers, *, train: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageDataset(samples, build_transforms(pp, train=train)),
        batch_size=batch_size,
        shuffle=train,
        num_workers=workers,
        generator=g,
        drop_last=False,
    )
