"""Step functions: one epoch of training, one pass of evaluation. They return metric dicts and
read no globals; the trainer composes them into the seed's two phases."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from melanoma_detector.calibration import sigmoid
from melanoma_detector.evaluation.metrics import binary_metrics
from melanoma_detector.training.auxiliary import AuxDiagnosis
from melanoma_detector.training.distributed import DistInfo, all_sum, gather_concat
from melanoma_detector.training.ema import WeightEma
from melanoma_detector.training.mixing import BatchMix


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from melanoma_detector.errors import UserError

        raise UserError("--device cuda requested but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def flush_denormals() -> bool:
    """Treat denormal floats as zero from now on, in this process.

    As Adam's second-moment estimates and small weights decay they become denormal, and x86 CPUs
    handle denormals in microcode: measured here, head epochs slowed from 1.7 s to 9.7 s over 25
    epochs (72 s in all) and stayed at 1.6 s with denormals flushed (41 s). Values below 1e-38
    carry no information for this model. The flag lives in each thread's FPU state and threads
    inherit it when they are created, so call this before the first parallel op creates
    torch's thread pool (threads created earlier keep computing with denormals)."""
    return torch.set_flush_denormal(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weights(labels: Iterable[int]) -> tuple[float, float]:
    """Keras-style balanced weights from the training split: n / (2 * n_class)."""
    labels = list(labels)
    n, n1 = len(labels), sum(labels)
    n0 = n - n1
    return (n / (2 * n0) if n0 else 1.0, n / (2 * n1) if n1 else 1.0)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: tuple[float, float] | None) -> torch.Tensor:
    """Keras' class_weight semantics: mean over the batch of weight * loss (not divided by the
    weights' sum). With equal per-rank batches, the mean over ranks that DDP's gradient
    averaging takes is then exactly the mean over the global batch."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    if weights is not None:
        w = torch.where(targets > 0.5, weights[1], weights[0]).to(loss.dtype)
        return (loss * w).mean()
    return loss.mean()


def pairwise_rank_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """RankNet's pairwise logistic loss, mean of softplus(z_benign - z_melanoma) over every
    (melanoma, benign) pair of the batch: a smooth surrogate of 1 - AUC. Per-item losses score
    each image alone; this term sees only score differences between the classes, so its gradient
    is largest for the benign images that outscore a melanoma, whatever their absolute scores. A
    batch without both classes contributes zero (kept in the graph, so backward still runs)."""
    z = logits.float().reshape(-1)
    positive = targets.reshape(-1) > 0.5
    pos, neg = z[positive], z[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return z.sum() * 0.0
    return nn.functional.softplus(neg[None, :] - pos[:, None]).mean()


@dataclass(frozen=True)
class Distillation:
    """Soft targets for training: `teacher_logits[i]` is the teachers' logit for dataset item i
    (batches carry the item index third). The loss is (1 - weight) * the hard-label loss +
    weight * T^2 * the binary KL divergence between the teachers' and the model's
    temperature-softened probabilities (Hinton et al.'s scaling keeps its gradient comparable
    across temperatures); both terms carry the class weights of the hard label."""

    teacher_logits: torch.Tensor
    weight: float = 0.5
    temperature: float = 2.0

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
             class_w: tuple[float, float] | None) -> torch.Tensor:
        hard = weighted_bce(logits, targets, class_w)
        t = self.temperature
        z = logits.float().reshape(-1) / t
        zt = self.teacher_logits.to(z.device)[index.to(z.device).long()].float().reshape(-1) / t
        pt = torch.sigmoid(zt)
        # BCE against soft targets minus the targets' own entropy: zero when the model agrees.
        kl = (nn.functional.binary_cross_entropy_with_logits(z, pt, reduction="none")
              - nn.functional.binary_cross_entropy_with_logits(zt, pt, reduction="none"))
        if class_w is not None:
            kl = kl * torch.where(targets.reshape(-1) > 0.5, class_w[1], class_w[0]).to(kl.dtype)
        return (1 - self.weight) * hard + self.weight * t * t * kl.mean()


def amp_dtype_for(name: str, device: torch.device) -> torch.dtype | None:
    """auto: bfloat16 on GPUs that support it (no loss scaling needed), float16 on older
    GPUs, full precision on CPU and MPS."""
    if name == "off" or device.type not in ("cuda", "cpu"):
        return None
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _batches(loader, max_steps: int | None):
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            return
        yield batch


def _item_loss(logits, aux_logits, targets, index, *, class_w, distill, aux, rank_weight) -> torch.Tensor:
    """The loss of a batch against per-item `targets` and dataset `index` (which item's soft and
    diagnosis targets apply), plus the batch-level ranking term when `rank_weight` is set."""
    loss = weighted_bce(logits, targets, class_w) if distill is None else distill.loss(logits, targets, index, class_w)
    if rank_weight:
        loss = loss + rank_weight * pairwise_rank_loss(logits, targets)
    if aux is not None and aux_logits is not None:
        loss = loss + aux.loss(aux_logits, index)
    return loss


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    class_w: tuple[float, float] | None = None,
    set_train_mode: Callable[[], None] | None = None,
    max_steps: int | None = None,
    progress: bool = False,
    desc: str = "train",
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    dist: DistInfo = DistInfo(),
    distill: Distillation | None = None,
    aux: AuxDiagnosis | None = None,
    ema: WeightEma | None = None,
    mix: BatchMix | None = None,
    rank_weight: float = 0.0,
) -> dict[str, float]:
    """One pass over `loader` ((inputs, targets, index) batches); returns {"loss", "auc", "n"}.
    With `distill`, the loss also pulls the model towards the teachers' soft targets; with `aux`
    (and a model that returns (logit, diagnosis logits) in train mode) it adds the diagnosis term;
    `ema` folds the weights into its average after every step. `mix` blends selected batches with
    a shuffled copy (mixup / cutmix) and the loss the same way; the reported training AUC then
    scores the model on the mixed inputs against the original items' labels. `rank_weight` adds
    that multiple of `pairwise_rank_loss` over the batch (against each blend's labels when mixed).

    Under DDP, `model` is the DistributedDataParallel wrapper and loss / AUC cover all ranks."""
    from tqdm import tqdm

    (set_train_mode or model.train)()
    total, count = 0.0, 0
    all_logits, all_targets = [], []
    total_steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    # Batches of one image cannot train every BatchNorm: alone, the head's (the seed's Keras would also
    # fail); under torchrun the head's norm is global, but a training backbone norm over a 1x1 map (inputs
    # of 32 px or less) still sees one value per channel. Every rank holds the same number of images
    # (DistributedSampler pads), so all ranks skip the same step together and no collective waits.
    skip_single = (any(isinstance(m, nn.BatchNorm2d) and m.training for m in model.modules()) if dist.enabled
                   else any(isinstance(m, nn.BatchNorm1d) for m in model.modules()))
    terms = {"class_w": class_w, "distill": distill, "aux": aux, "rank_weight": rank_weight}
    bar = tqdm(_batches(loader, max_steps), total=total_steps, desc=desc, disable=not progress, leave=False)
    for batch in bar:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if x.shape[0] < 2 and skip_single:
            continue
        mixed = mix(x) if mix is not None else None
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(x if mixed is None else mixed.inputs)
        logits, aux_logits = out if isinstance(out, tuple) else (out, None)
        index = batch[2] if len(batch) > 2 else None
        if mixed is None:
            loss = _item_loss(logits, aux_logits, y, index, **terms)
        else:
            other = index[mixed.perm.to(index.device)] if index is not None else None
            loss = (mixed.lam * _item_loss(logits, aux_logits, y, index, **terms)
                    + (1 - mixed.lam) * _item_loss(logits, aux_logits, y[mixed.perm.to(y.device)], other, **terms))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError("training loss is not finite; lower the learning rate")
        total += loss_value * x.shape[0]
        count += x.shape[0]
        all_logits.append(logits.detach().float().cpu())
        all_targets.append(y.detach().float().cpu())
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    total, count = all_sum([total, float(count)], dist)
    out = {"loss": total / max(count, 1), "n": int(count)}
    if dist.enabled or all_logits:
        y_np = gather_concat(torch.cat(all_targets).numpy() if all_targets else np.zeros(0, np.float32), dist)
        z_np = gather_concat(torch.cat(all_logits).numpy() if all_logits else np.zeros(0, np.float32), dist)
        if len(y_np):
            out["auc"] = binary_metrics(y_np, sigmoid(z_np))["roc_auc"]
    return out


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader, *, device: torch.device, progress: bool = False, desc: str = "predict",
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    model.eval()
    logits, targets = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(batch[0].to(device, non_blocking=True))
        logits.append(out.float().cpu())
        targets.append(batch[1].float())
    if not logits:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    class_w: tuple[float, float] | None = None,
    progress: bool = False,
    desc: str = "val",
    amp_dtype: torch.dtype | None = None,
    dist: DistInfo = DistInfo(),
) -> dict[str, float]:
    """{"loss", "auc", "accuracy"} of `model` on `loader`, plus the raw logits and targets.

    Under torchrun each rank passes its own slice of the validation set; the metrics are computed
    once over the whole set gathered in order, never averaged per rank."""
    logits, targets = predict_logits(model, loader, device=device, progress=progress, desc=desc, amp_dtype=amp_dtype)
    logits, targets = gather_concat(logits, dist), gather_concat(targets, dist)
    loss = weighted_bce(torch.from_numpy(logits), torch.from_numpy(targets), class_w).item()
    m = binary_metrics(targets, sigmoid(logits))
    return {"loss": loss, "auc": m["roc_auc"], "accuracy": m["accuracy"], "logits": logits, "targets": targets}
