"""PyTorch's own distributed engine (torchrun + DistributedDataParallel), and the few collective
helpers the trainer needs.

`torchrun --nproc_per_node=N -m melanoma_detector train ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
`init_distributed` reads them. One process without torchrun is world size 1 and every helper
here is a no-op, so the trainer has one code path.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs) and pick this
    rank's device; without torchrun, resolve the device for a single process."""
    from melanoma_detector.training.engine import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps":
        from melanoma_detector.errors import UserError

        raise UserError("distributed training runs on CUDA (NCCL) or CPU (gloo), not MPS; pass --device cpu or cuda")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Feature caching on one rank can take minutes while the others wait at a barrier.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    log.info("distributed: rank %d of %d on %s (%s)", info.rank, world, device, dist.get_backend())
    return info, device


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shard_range(n: int, info: DistInfo) -> tuple[int, int]:
    """Contiguous, near-equal slice [start, end) of n items for this rank (no padding, so
    gathering the slices in rank order gives back exactly the n items)."""
    base, extra = divmod(n, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return start, start + base + (1 if info.rank < extra else 0)


def gather_concat(arr: np.ndarray, info: DistInfo) -> np.ndarray:
    """Concatenate every rank's array in rank order (sizes may differ)."""
    if not info.enabled:
        return arr
    import torch.distributed as dist

    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, arr)
    return np.concatenate(parts)


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def broadcast_buffers(tensors, info: DistInfo) -> None:
    """Copy rank 0's values of `tensors` (a module's buffers, EMA averages) to every rank, in place.

    After an epoch each rank's BatchNorm running statistics were last updated from its own batches (DDP copies
    rank 0's buffers at the start of every forward pass, then each rank updates its own). Validated as they
    were, each rank's slice of the validation set would be scored by a different model, and the gathered
    metric, which picks the checkpoint, would belong to none of them."""
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the whole global batch across ranks.

    torch's SyncBatchNorm only runs on GPUs; on CPU (gloo) the head's BatchNorm would otherwise
    normalise each rank's slice on its own, and N processes at batch b would not train like one
    process at batch N*b. The all-reduce is differentiable, so gradients are exact too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce

        # float32 whatever the autocast: E[x^2] - mean^2 in bf16 cancels to garbage (even a negative variance)
        out_dtype = x.dtype
        x = x.float()
        n_local = torch.tensor([float(x.shape[0])], dtype=torch.float32, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private API
            stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), n_local]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
        y = (x - mean) / torch.sqrt(var + self.eps)
        return (y * self.weight + self.bias if self.affine else y).to(out_dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch statistics over all ranks: torch's SyncBatchNorm on GPUs; on CPUs the head's
    BatchNorm1d becomes `GlobalBatchNorm1d` (2-D BatchNorm in the backbone keeps per-rank
    statistics there, as torch offers no CPU SyncBatchNorm)."""
    if device.type == "cuda":
        try:
            from timm.layers import convert_sync_batchnorm  # also handles timm's BatchNormAct2d

            return convert_sync_batchnorm(module)
        except ImportError:
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(child.num_features, eps=child.eps, momentum=child.momentum,
                                    affine=child.affine, track_running_stats=child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
