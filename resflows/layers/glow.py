"""Invertible linear maps (Glow's 1x1 convolution), initialised to a random permutation."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FlowLayer

Tensor = torch.Tensor

__all__ = ["InvertibleLinear", "InvertibleConv2d"]


class InvertibleLinear(FlowLayer):
    """``y = W x`` on [B, D]; log|det W| per example."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.eye(dim)[torch.randperm(dim)])

    def _logdet(self, x: Tensor) -> Tensor:
        return torch.linalg.slogdet(self.weight)[1].expand(x.shape[0])

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return F.linear(x, self.weight), self._logdet(x)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        return F.linear(y, torch.linalg.inv(self.weight)), -self._logdet(y)


class InvertibleConv2d(FlowLayer):
    """Invertible 1x1 convolution (``--quadratic``); log-det is H W log|det W|."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.eye(dim)[torch.randperm(dim)])

    def _logdet(self, x: Tensor) -> Tensor:
        return (torch.linalg.slogdet(self.weight)[1] * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return F.conv2d(x, self.weight.view(self.dim, self.dim, 1, 1)), self._logdet(x)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        w_inv = torch.linalg.inv(self.weight)
        return F.conv2d(y, w_inv.view(self.dim, self.dim, 1, 1)), -self._logdet(y)
