"""Multi-process training helpers: ``torchrun`` set-up, samplers, reductions and buffer sync.

A plain ``python train_img.py`` run is a world of size 1 and every helper here is a no-op for it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = [
    "DistInfo",
    "rank_seed",
    "setup_distributed",
    "cleanup_distributed",
    "is_distributed",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast_buffers",
    "ResumableDistributedSampler",
    "ShardSampler",
]


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """The seed of rank ``rank``'s own random streams (Hutchinson probes, series lengths) in a run of
    ``world_size`` processes: ``seed * world_size + rank``. Two (seed, rank) pairs of runs with the same number
    of processes never share a stream (``seed + rank`` made seed 0 on rank 1 draw what seed 1 draws on rank 0);
    a single process keeps ``seed``."""
    return seed * world_size + rank


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` set); NCCL on GPUs,
    gloo on CPU. Otherwise a single process on ``device`` ('auto' = cuda if available)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                    **({"device_id": dev} if use_cuda else {}))
        return DistInfo(rank, world, local, dev)
    if device == "auto":
        dev = torch.device("cuda" if use_cuda else "cpu")
    else:
        dev = torch.device(device)
    return DistInfo(0, 1, 0, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_mean(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Average a dict of scalars across ranks (one collective)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer from rank ``src`` (running means, power-iteration vectors, estimator moments),
    so that all ranks hold bitwise identical state at step boundaries."""
    if not is_distributed():
        return
    buffers = [b for b in module.buffers()]
    if not buffers:
        return
    # Coalesce per dtype to keep the number of collectives small.
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for b in buffers:
        by_dtype.setdefault(b.dtype, []).append(b)
    for group in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src)
        offset = 0
        for b in group:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view_as(b))
            offset += n


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``) that can start an epoch after ``skip``
    batches, so a resumed run continues with exactly the batches it had not seen."""

    def __init__(self, dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = skip_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip * self.batch_size :])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip * self.batch_size, 0)


class ShardSampler(Sampler[int]):
    """Deterministic, unpadded shard ``rank::world`` of a test set: every image is evaluated exactly once."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
