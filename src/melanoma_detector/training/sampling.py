"""Training order: torch's DistributedSampler for every run (one process is world size 1), with
the epoch folded into the index so datasets can seed each item's augmentation per epoch.

With N ranks at batch b, rank r's k-th batch is `perm[r::N][k*b:(k+1)*b]`, and the union of the
N batches is `perm[k*N*b:(k+1)*N*b]`: exactly the k-th batch of one process at batch N*b. That is
why a distributed run matches a single-process run at the same effective batch and seed, when the
number of training images is a multiple of N: otherwise DistributedSampler pads the epoch with up to N - 1
repeated images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from melanoma_detector.data.dataset import ImageDataset
from melanoma_detector.data.transforms import build_transforms
from melanoma_detector.training.distributed import DistInfo


class EpochSampler(Sampler[int]):
    """This rank's share of a seeded permutation for the current epoch, as `epoch * n + i`."""

    def __init__(self, n: int, info: DistInfo = DistInfo(), *, shuffle: bool = True, seed: int = 0):
        self.n = n
        self.epoch = 0
        self.inner = DistributedSampler(
            range(n), num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=False
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.n
        return (offset + i for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class TensorBatches:
    """Mini-batches straight from in-memory tensors, in `EpochSampler` order: for the head phase,
    where a DataLoader's per-item indexing and collation cost more than the head's own step."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool, seed: int = 0,
                 info: DistInfo = DistInfo()):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.sampler = EpochSampler(len(x), info, shuffle=shuffle, seed=seed) if shuffle else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.x)
        return -(-n // self.batch_size)

    def __iter__(self):
        if self.sampler is None:
            idx = torch.arange(len(self.x))
        else:
            idx = torch.tensor(list(self.sampler), dtype=torch.long) % len(self.x)
            if self.sampler.inner.num_replicas == 1:
                self.set_epoch(self.epoch + 1)  # plain loops that never call set_epoch still reshuffle
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            yield self.x[j], self.y[j], j


def set_epoch(loader, epoch: int) -> None:
    """Tell a loader's sampler (or a TensorBatches) which epoch starts."""
    target = loader if isinstance(loader, TensorBatches) else getattr(loader, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def build_image_loader(samples, pp, batch_size, *, workers: int, device: torch.device, train: bool, seed: int = 0,
                       dist: DistInfo = DistInfo(), augmentation: str = "standard") -> DataLoader:
    """Decode-and-transform loader over `samples`: seeded, rank-sharded order when training, file order
    otherwise (so predictions line up with `samples`)."""
    dataset = ImageDataset(samples, build_transforms(pp, train=train, augmentation=augmentation), seed=seed if train else None)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), dist, seed=seed) if train else None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=False,
    )
