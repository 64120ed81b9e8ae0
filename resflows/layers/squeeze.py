"""Space-to-depth squeeze: [B, C, H, W] -> [B, 4C, H/2, W/2], channel order (c, dy, dx)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .base import FlowLayer, zeros_logdet

Tensor = torch.Tensor

__all__ = ["SqueezeLayer", "squeeze", "unsqueeze"]


def squeeze(x: Tensor, factor: int = 2) -> Tensor:
    """Space-to-depth; output channel ``c * r^2 + dy * r + dx`` holds ``x[c, r*i + dy, r*j + dx]``."""
    return F.pixel_unshuffle(x, factor)


def unsqueeze(x: Tensor, factor: int = 2) -> Tensor:
    """Inverse of :func:`squeeze` (pixel shuffle)."""
    return F.pixel_shuffle(x, factor)


class SqueezeLayer(FlowLayer):
    """Volume-preserving squeeze (log-det 0)."""

    def __init__(self, downscale_factor: int = 2):
        super().__init__()
        self.downscale_factor = downscale_factor

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.shape[2] % self.downscale_factor or x.shape[3] % self.downscale_factor:
            raise ValueError(f"squeeze needs H and W divisible by {self.downscale_factor}, got {tuple(x.shape[2:])}")
        return squeeze(x, self.downscale_factor), zeros_logdet(x)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        return unsqueeze(y, self.downscale_factor), zeros_logdet(y)
