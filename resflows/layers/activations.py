"""Activations for Lipschitz-constrained residual branches (all 1-Lipschitz unless stated)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused import lipswish

Tensor = torch.Tensor

__all__ = [
    "LipSwish",
    "Swish",
    "CLipSwish",
    "Identity",
    "FullSort",
    "MaxMin",
    "LipschitzCube",
    "ACTIVATIONS",
    "make_activation",
]


class LipSwish(nn.Module):
    """LipSwish ``x * sigmoid(x * softplus(beta)) / 1.1`` (Chen et al. 2019, Sec. 4): Swish has
    Lipschitz constant at most 1.1 for any positive slope, so dividing by 1.1 makes it 1-Lipschitz
    while keeping non-vanishing second derivatives (needed by the Neumann gradient)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x: Tensor) -> Tensor:
        return lipswish(x, self.beta)  # same formula; hand-written derivatives (resflows/layers/fused.py)


Swish = LipSwish  # the paper's name for it (`--act swish`)


class CLipSwish(nn.Module):
    """Concatenated LipSwish ``[LipSwish(x), LipSwish(-x)] / 1.004`` (Perugachi-Diaz et al., Invertible
    DenseNets, 2021): doubles the channels (dim 1) and stays 1-Lipschitz."""

    out_multiplier = 2

    def __init__(self):
        super().__init__()
        self.swish = LipSwish()

    def forward(self, x: Tensor) -> Tensor:
        return self.swish(torch.cat([x, -x], 1)) / 1.004


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class FullSort(nn.Module):
    """Sort the features (dim 1): a 1-Lipschitz, gradient-norm-preserving activation (Anil et al. 2019)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sort(x, 1)[0]


class MaxMin(nn.Module):
    """GroupSort with groups of two: [max of each pair, min of each pair] (Anil et al. 2019)."""

    def forward(self, x: Tensor) -> Tensor:
        b, d = x.shape[0], x.shape[1]
        if d % 2:
            raise ValueError(f"MaxMin needs an even number of features, got {d}")
        pairs = x.reshape(b, d // 2, 2, *x.shape[2:])
        return torch.cat([pairs.max(2)[0], pairs.min(2)[0]], 1)


class LipschitzCube(nn.Module):
    """x^3 / 3 on [-1, 1], continued linearly with slope 1 outside."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x >= 1, x - 2 / 3, torch.where(x <= -1, x + 2 / 3, x**3 / 3))



# Name -> constructor. The paper's `--act` choices first; toy-only extras after.
ACTIVATIONS = {
    "softplus": lambda: nn.Softplus(),
    "elu": lambda: nn.ELU(),
    "swish": LipSwish,
    "lcube": LipschitzCube,
    "identity": Identity,
    "relu": lambda: nn.ReLU(),
    "tanh": lambda: nn.Tanh(),
    "selu": lambda: nn.SELU(),  # not 1-Lipschitz (slope up to ~1.76); offered by the paper's toy script
    "fullsort": FullSort,
    "maxmin": MaxMin,
    "clipswish": CLipSwish,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (see ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}") from None
