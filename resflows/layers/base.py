"""The flow-layer contract shared by every invertible layer in resflows.

Direction is data -> latent. For a layer ``f``:

* ``forward(x)`` returns ``(y, logabsdet)`` with ``y = f(x)`` and ``logabsdet = log|det df/dx|``,
  one value per example (shape ``[B]``);
* ``inverse(y)`` returns ``(x, logabsdet)`` with ``x = f^{-1}(y)`` and
  ``logabsdet = log|det df^{-1}/dy| = -log|det df/dx|`` evaluated at ``x``.

So ``log p(x) = log p(f(x)) + forward(x)[1]``. This sign convention is stated here once; every layer
follows it. Module and attribute names are chosen so that a model assembled from these layers has the
same ``state_dict`` keys as the paper's code (``transforms.0.chain.2.nnet.0.weight``).
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.nn as nn

Tensor = torch.Tensor

__all__ = ["FlowLayer", "SequentialFlow", "zeros_logdet", "HostCopy"]


class HostCopy:
    """A host number computed from a small tensor (a flag, a frozen parameter), re-read only when the tensor
    changed: another storage (``.to``, a copy) or an in-place write (``load_state_dict``, ``fill_``), which
    bumps its version. On a GPU every read is a device synchronisation; a training step's forward must not
    make one per layer."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, t: Tensor, read):
        try:
            key = (t.device, t.data_ptr(), t._version)
        except RuntimeError:  # inference tensors have no version counter: read every time
            return read(t)
        if key != self._key:
            self._value, self._key = read(t), key
        return self._value


def zeros_logdet(x: Tensor) -> Tensor:
    """A zero log-det of shape ``[B]`` matching ``x``'s dtype and device."""
    return x.new_zeros(x.shape[0])


class FlowLayer(nn.Module):
    """Base class: ``forward(x) -> (y, logabsdet[B])``, ``inverse(y) -> (x, logabsdet[B])``."""

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def transform(self, x: Tensor) -> Tensor:
        """``f(x)`` without the log-det (cheaper where the log-det is estimated, e.g. iResBlock)."""
        return self.forward(x)[0]

    def invert(self, y: Tensor) -> Tensor:
        """``f^{-1}(y)`` without the log-det (cheaper where the log-det is estimated, e.g. iResBlock)."""
        return self.inverse(y)[0]


class SequentialFlow(FlowLayer):
    """A chain of flow layers; log-dets add up. The module list is called ``chain`` (paper key names)."""

    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        self.chain = nn.ModuleList(list(layers))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        logdet = zeros_logdet(x)
        for layer in self.chain:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        logdet = zeros_logdet(y)
        for layer in reversed(self.chain):
            y, ld = layer.inverse(y)
            logdet = logdet + ld
        return y, logdet

    def transform(self, x: Tensor) -> Tensor:
        for layer in self.chain:
            x = layer.transform(x)
        return x

    def invert(self, y: Tensor) -> Tensor:
        for layer in reversed(self.chain):
            y = layer.invert(y)
        return y

    def __len__(self) -> int:
        return len(self.chain)

    def __getitem__(self, idx: int) -> nn.Module:
        return self.chain[idx]
