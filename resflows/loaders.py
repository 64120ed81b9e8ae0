"""The data loaders of one image run: the training set sharded over the ranks with exact mid-epoch resume,
and the test set seen exactly once over all ranks."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from .config import ConfigError, TrainConfig
from .datasets import build_dataset
from .distributed import DistInfo, ResumableDistributedSampler, ShardSampler
from .factory import image_size

__all__ = ["RunData", "build_data", "tensor_data"]


@dataclass
class RunData:
    """The datasets, sampler and loaders a :class:`resflows.trainer.Trainer` reads (training ones absent
    for evaluation). ``batches_per_epoch`` is the full epoch length per rank."""

    test_set: Any
    test_loader: DataLoader
    train_set: Any = None
    sampler: Optional[ResumableDistributedSampler] = None
    train_loader: Optional[DataLoader] = None
    batches_per_epoch: int = 1


def _workers(requested: int) -> int:
    # More workers than cores only adds contention (torch warns about it): cap at the cores we have.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(requested, cores))


def build_data(cfg: TrainConfig, dist: DistInfo, train: bool = True) -> RunData:
    """The ``--data`` test set (and, with ``train``, the training set) for this rank."""
    seed = cfg.seed or 0
    # --var-deq draws the noise in the model (q(u | x)) and --eval-dequant-samples K > 1 draws K noises per
    # test image in the evaluation: their loaders give noise-free images.
    add_noise = cfg.add_noise and not cfg.var_deq
    common = dict(dataroot=cfg.dataroot, imagesize=image_size(cfg), nbits=cfg.nbits, task=cfg.task,
                  add_noise=add_noise, padding=cfg.padding, padding_dist=cfg.padding_dist,
                  rcrop_pad_mode=cfg.rcrop_pad_mode, seed=seed, dequant=cfg.dequant)
    # Own generator: creating loader iterators must not consume the global RNG (exact resume). Workers
    # are not persistent: each epoch's workers must see the dataset's new epoch (its noise and flips).
    loader_kw = dict(num_workers=_workers(cfg.nworkers), pin_memory=dist.device.type == "cuda",
                     persistent_workers=False, generator=torch.Generator())
    test_set = build_dataset(cfg.data, train=False, **dict(common, add_noise=add_noise and cfg.eval_dequant_samples == 1))
    test_set.set_epoch(-1)  # fixed dequantisation noise: test bits/dim comparable across epochs
    test_loader = DataLoader(test_set, batch_size=max(cfg.val_batchsize // dist.world_size, 1),
                             sampler=ShardSampler(len(test_set), dist.rank, dist.world_size), **loader_kw)
    data = RunData(test_set=test_set, test_loader=test_loader)
    if train:
        per_rank = cfg.batchsize // dist.world_size
        data.train_set = build_dataset(cfg.data, train=True, **common)
        if len(data.train_set) < cfg.batchsize:
            raise ConfigError(f"--batchsize {cfg.batchsize} is larger than the training set ({len(data.train_set)} images)")
        data.sampler = ResumableDistributedSampler(data.train_set, per_rank, dist.world_size, dist.rank, True, seed)
        data.train_loader = DataLoader(data.train_set, batch_size=per_rank, sampler=data.sampler, drop_last=True, **loader_kw)
        # Full epoch length (len(train_loader) shrinks when a resumed epoch skips its first batches).
        data.batches_per_epoch = data.sampler.num_samples // per_rank
    return data


def tensor_data(x: torch.Tensor, y: torch.Tensor, batchsize: int) -> RunData:
    """In-memory images ``x`` and labels ``y`` as both sets, unsharded and unshuffled: for benchmarks and
    tests that drive single steps (``forward_backward``, ``optimize``, ``validate``), not ``fit``."""
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=batchsize)
    return RunData(test_set=ds, test_loader=loader, train_set=ds, train_loader=loader, batches_per_epoch=len(loader))
