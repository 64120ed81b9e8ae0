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
    Mean and std are plain attributes, not state (the paper's checkpoints have no keys for them)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def _stats(self, x: Tensor):
        c = len(self.mean)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
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
        return f"mean={self.mean}, std={self.std}"
