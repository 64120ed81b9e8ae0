"""ActNorm (Kingma & Dhariwal 2018): per-channel affine map with data-dependent initialisation."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .base import FlowLayer, HostCopy

Tensor = torch.Tensor

__all__ = ["ActNorm1d", "ActNorm2d", "ActNormNd"]


def _global_mean_var(x_t: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row mean and unbiased variance of ``x_t`` ([C, n]); pooled over all ranks when running
    distributed, so that every rank initialises to the same values."""
    n = torch.tensor(float(x_t.shape[1]), dtype=torch.float64, device=x_t.device)
    s1 = x_t.double().sum(1)
    s2 = (x_t.double() ** 2).sum(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stats = torch.cat([s1, s2, n.reshape(1)])
        dist.all_reduce(stats)
        c = s1.numel()
        s1, s2, n = stats[:c], stats[c : 2 * c], stats[2 * c]
    mean = s1 / n
    var = (s2 - n * mean**2) / (n - 1).clamp_min(1)
    return mean.to(x_t.dtype), var.to(x_t.dtype)


class ActNormNd(FlowLayer):
    """``y = (x + bias) * exp(weight)``; the first forward sets ``bias = -mean`` and
    ``weight = -0.5 log(max(var, 0.2))`` from the batch (unbiased variance, as the paper's code).
    ``eps`` is accepted for the paper's signature and unused (the variance is clamped at 0.2 instead)."""

    def __init__(self, num_features: int, eps: float = 1e-12):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(0))
        self._initialized_host = HostCopy()  # the flag read once, not in every forward (a GPU synchronisation)

    @property
    def shape(self):  # pragma: no cover - interface
        raise NotImplementedError

    def _spatial(self, x: Tensor) -> int:
        return x[0, 0].numel()

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        c = x.size(1)
        x_t = x.detach().transpose(0, 1).reshape(c, -1)
        mean, var = _global_mean_var(x_t)
        var = torch.clamp(var, min=0.2)
        self.bias.copy_(-mean)
        self.weight.copy_(-0.5 * torch.log(var))
        self.initialized.fill_(1)

    def is_initialized(self) -> bool:
        return self._initialized_host.get(self.initialized, lambda t: bool(t))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.is_initialized():
            self._initialize(x)
        y = (x + self.bias.view(*self.shape)) * torch.exp(self.weight.view(*self.shape))
        return y, self._logdet(x)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        if not self.is_initialized():
            raise RuntimeError("ActNorm is not initialised: run a forward pass on data first")
        x = y * torch.exp(-self.weight.view(*self.shape)) - self.bias.view(*self.shape)
        return x, -self._logdet(y)

    def _logdet(self, x: Tensor) -> Tensor:
        return (self.weight.sum() * self._spatial(x)).expand(x.shape[0])

    def extra_repr(self) -> str:
        return str(self.num_features)


class ActNorm1d(ActNormNd):
    shape = (1, -1)


class ActNorm2d(ActNormNd):
    shape = (1, -1, 1, 1)
