"""Affine coupling blocks (Dinh et al. 2017), the baseline of ``--block coupling``.

``y_b = x_b * sigmoid(s(x_a) + 2) + t(x_a)``, ``y_a = x_a``; the sigmoid scale (Glow's choice, +2 so it
starts near 1) keeps the map well conditioned. Channel splits allow odd channel counts: the conditioning
half ``a`` has ``C // 2`` channels (or ``C - C // 2`` when swapped) and the network outputs ``2 |b|``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from .base import FlowLayer

Tensor = torch.Tensor

__all__ = ["CouplingBlock", "ChannelCouplingBlock", "MaskedCouplingBlock", "checkerboard_mask", "coupling_split"]


def coupling_split(dim: int, swap: bool) -> Tuple[int, int]:
    """(|a|, |b|): channels conditioned on and channels transformed."""
    d = dim // 2
    return (dim - d, d) if swap else (d, dim - d)


class CouplingBlock(FlowLayer):
    """Coupling over dim 1: ``a = x[:, :d]``, ``b = x[:, d:]`` (swapped when ``swap``), d = dim // 2."""

    def __init__(self, dim: int, nnet: nn.Module, swap: bool = False):
        super().__init__()
        self.dim = dim
        self.d = dim // 2
        self.nnet = nnet
        self.swap = swap

    def _split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.swap:
            return x[:, self.d :], x[:, : self.d]
        return x[:, : self.d], x[:, self.d :]

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([b, a] if self.swap else [a, b], 1)

    def _scale_shift(self, x_a: Tensor, nb: int) -> Tuple[Tensor, Tensor]:
        f = self.nnet(x_a)
        return torch.sigmoid(f[:, :nb] + 2.0), f[:, nb:]

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x_a, x_b = self._split(x)
        scale, shift = self._scale_shift(x_a, x_b.shape[1])
        y_b = x_b * scale + shift
        return self._join(x_a, y_b), torch.log(scale).reshape(x.shape[0], -1).sum(1)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        y_a, y_b = self._split(y)
        scale, shift = self._scale_shift(y_a, y_b.shape[1])
        x_b = (y_b - shift) / scale
        return self._join(y_a, x_b), -torch.log(scale).reshape(y.shape[0], -1).sum(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, swap={self.swap}"


class ChannelCouplingBlock(CouplingBlock):
    """Channel-wise coupling for images; ``mask_type`` 'channel0' or 'channel1' (swapped)."""

    def __init__(self, dim: int, nnet: nn.Module, mask_type: str = "channel0"):
        if mask_type not in ("channel0", "channel1"):
            raise ValueError(f"unknown channel mask type {mask_type!r}")
        super().__init__(dim, nnet, swap=mask_type == "channel1")
        self.mask_type = mask_type


def checkerboard_mask(x: Tensor, swap: bool = False) -> Tensor:
    """1 on the pixels conditioned on: (i + j) even, or odd when ``swap``; same for every channel."""
    h, w = x.shape[2], x.shape[3]
    i = torch.arange(h, device=x.device).view(h, 1)
    j = torch.arange(w, device=x.device).view(1, w)
    m = ((i + j) % 2 == (1 if swap else 0)).to(x.dtype)
    return m.view(1, 1, h, w)


class MaskedCouplingBlock(FlowLayer):
    """Checkerboard coupling: ``y = x_a + (1 - m) (x sigmoid(s(x_a) + 2) + t(x_a))`` with ``x_a = m x``;
    the network maps C channels to 2C (scale, shift)."""

    def __init__(self, dim: int, nnet: nn.Module, mask_type: str = "checkerboard0"):
        super().__init__()
        if mask_type not in ("checkerboard0", "checkerboard1"):
            raise ValueError(f"unknown checkerboard mask type {mask_type!r}")
        self.d = dim
        self.nnet = nnet
        self.mask_type = mask_type

    def _mask(self, x: Tensor) -> Tensor:
        return checkerboard_mask(x, swap=self.mask_type == "checkerboard1")

    def _scale_shift(self, x_a: Tensor) -> Tuple[Tensor, Tensor]:
        f = self.nnet(x_a)
        return torch.sigmoid(f[:, : self.d] + 2.0), f[:, self.d :]

    def _logdet(self, scale: Tensor, m: Tensor) -> Tensor:
        return (torch.log(scale) * (1 - m)).reshape(scale.shape[0], -1).sum(1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        m = self._mask(x)
        x_a = m * x
        scale, shift = self._scale_shift(x_a)
        y = x_a + (1 - m) * (x * scale + shift)
        return y, self._logdet(scale, m)

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        m = self._mask(y)
        y_a = m * y
        scale, shift = self._scale_shift(y_a)
        x = y_a + (1 - m) * (y - shift) / scale
        return x, -self._logdet(scale, m)

    def extra_repr(self) -> str:
        return f"dim={self.d}, mask_type={self.mask_type}"
