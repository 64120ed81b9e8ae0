"""Element-wise flow layers: the logit transform of pixels in [0, 1] and a fixed normalisation."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from .base import FlowLayer

Tensor = torch.Tensor

__all__ = ["LogitTransform", "Normalize"]


class LogitTransform(FlowLayer):
    """``y = logit(alpha + (1 - 2 alpha) x)``: maps dequantised pixels in [0, 1] to the real line
    (alpha keeps it away from 0 and 1; the paper uses 1e-6 for MNIST and 0.05 otherwise)."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        return y, self._logdet(s)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        s = torch.sigmoid(y)
        x = (s - self.alpha) / (1 - 2 * self.alpha)
        return x, -self._logdet(s)

    def _logdet(self, s: Tensor) -> Tensor:
        # d/dx logit(alpha + (1 - 2 alpha) x) = (1 - 2 alpha) / (s (1 - s))
        ld = -torch.log(s) - torch.log1p(-s) + math.log(1 - 2 * self.alpha)
        return ld.reshape(s.shape[0], -1).sum(1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Normalize(FlowLayer):
    """``y = (x - mean) / std`` per channel (the init layer of CIFAR-10 classification / hybrid models).
    Mean and std are float32 buffers, as in the paper's code, so its checkpoints carry (and set) them."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor([float(m) for m in mean], dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor([float(s) for s in std], dtype=torch.float32))

    def _stats(self, x: Tensor):
        c = self.mean.numel()
        mean = self.mean.to(x.dtype).view(1, c, 1, 1)
        std = self.std.to(x.dtype).view(1, c, 1, 1)
        return c, mean, std

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        c, mean, std = self._stats(x)
        y = torch.cat([(x[:, :c] - mean) / std, x[:, c:]], 1)
        return y, self._logdet(x, std)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        c, mean, std = self._stats(y)
        x = torch.cat([y[:, :c] * std + mean, y[:, c:]], 1)
        return x, -self._logdet(y, std)

    def _logdet(self, x: Tensor, std: Tensor) -> Tensor:
        hw = x.shape[2] * x.shape[3]
        return (-torch.log(std).sum() * hw).expand(x.shape[0])

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
