"""Fully connected pieces of the image model: :class:`FCNet`, a residual (or coupling) branch on a
flattened ``[B, C, H, W]`` input, and :class:`FCWrapper`, which applies a ``[B, D]`` flow layer to
``[B, C, H, W]`` tensors. Attribute names (``nnet``, ``fc_module``) match the paper's ``state_dict`` keys."""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

from . import linearize
from .activations import make_activation
from .base import FlowLayer

Tensor = torch.Tensor

__all__ = ["FCNet", "FCWrapper"]


class FCWrapper(FlowLayer):
    """Applies a flow layer on ``[B, D]`` to a ``[B, C, H, W]`` tensor by flattening."""

    def __init__(self, fc_module: nn.Module):
        super().__init__()
        self.fc_module = fc_module

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        y, logdet = self.fc_module(x.reshape(x.shape[0], -1))
        return y.reshape(x.shape), logdet

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        x, logdet = self.fc_module.inverse(y.reshape(y.shape[0], -1))
        return x.reshape(y.shape), logdet

    def transform(self, x: Tensor) -> Tensor:
        return self.fc_module.transform(x.reshape(x.shape[0], -1)).reshape(x.shape)

    def invert(self, y: Tensor) -> Tensor:
        return self.fc_module.invert(y.reshape(y.shape[0], -1)).reshape(y.shape)


class FCNet(nn.Module):
    """Fully connected residual branch on a flattened ``[B, C, H, W]`` input, output reshaped to
    ``out_shape``: ``[act] Linear(D_in, idim) act ... Linear(idim, D_out)``. ``linear_factory(i, n_in, n_out)``
    builds the i-th linear layer (normalised in residual blocks, plain in coupling blocks)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        idim: int,
        nhidden: int,
        act: str,
        preact: bool,
        dropout: float,
        linear_factory: Callable[[int, int, int], nn.Module],
    ):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        layers: List[nn.Module] = []
        mult = 1
        if preact:
            layers.append(make_activation(act))
            mult = getattr(layers[-1], "out_multiplier", 1)
        last = math.prod(in_shape)
        for i in range(nhidden):
            layers.append(linear_factory(i, last * mult, idim))
            layers.append(make_activation(act))
            mult = getattr(layers[-1], "out_multiplier", 1)
            last = idim
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(linear_factory(nhidden, last * mult, math.prod(out_shape)))
        self.nnet = nn.Sequential(*layers)

    @classmethod
    def wrap(cls, in_shape: Sequence[int], out_shape: Sequence[int], nnet: nn.Sequential) -> "FCNet":
        """An FCNet around ready-made layers (the fully connected dense branches)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.nnet = nnet
        return self

    def forward(self, x: Tensor) -> Tensor:
        y = self.nnet(x.reshape(x.shape[0], -1))
        return y.reshape(y.shape[0], *self.out_shape)


# The same map for the hand-written linearisation of residual branches (see resflows.layers.linearize).
linearize.register(FCNet, linearize.flattened(lambda m: m.nnet, lambda m: m.out_shape))
