"""Mean-only moving batch normalisation used inside residual branches (``--batchnorm``)."""
from __future__ import annotations

import torch
import torch.nn as nn

Tensor = torch.Tensor

__all__ = ["MovingBatchNorm1d", "MovingBatchNorm2d"]


class MovingBatchNormNd(nn.Module):
    """``y = x - running_mean + bias``; the running mean tracks batch means in training.

    As in the paper's code (bn_lag = 0) the *running* mean is subtracted, also in training, so the
    map is a per-channel shift: 1-Lipschitz, invertible, log-det 0, and examples never interact.
    The running mean is updated after use with ``running_mean -= decay * (running_mean - batch_mean)``.
    ``eps`` is accepted for the paper's signature and unused (a shift divides by nothing).

    A branch module, not a flow layer: ``forward`` returns the tensor alone (it sits inside residual and
    coupling branches) and :meth:`invert` is its inverse map. Between flow layers it is
    ``resflows.toy.model.MovingBatchNormFlow1d``, which keeps the flow-layer contract.
    """

    shape = (1, -1)

    def __init__(self, num_features: int, eps: float = 1e-4, decay: float = 0.1, affine: bool = True):
        super().__init__()
        self.num_features = num_features
        self.decay, self.affine = decay, affine
        self.register_buffer("step", torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        used_mean = self.running_mean.clone()
        if self.training:
            with torch.no_grad():
                batch_mean = x.detach().transpose(0, 1).reshape(x.shape[1], -1).mean(1)
                self.running_mean.sub_(self.decay * (self.running_mean - batch_mean))
                self.step.add_(1)
        return self.shift(x, used_mean)

    def shift(self, x: Tensor, mean: Tensor) -> Tensor:
        """``x - mean + bias``: the map ``forward`` applies with the mean it used (the linearised route
        re-applies it with the mean recorded in the forward pass)."""
        y = x - mean.view(*self.shape)
        if self.bias is not None:
            y = y + self.bias.view(*self.shape)
        return y

    def invert(self, y: Tensor) -> Tensor:
        """Inverse of the evaluation-mode map (the tensor alone, as ``forward``)."""
        if self.bias is not None:
            y = y - self.bias.view(*self.shape)
        return y + self.running_mean.view(*self.shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, decay={self.decay}"


class MovingBatchNorm1d(MovingBatchNormNd):
    shape = (1, -1)


class MovingBatchNorm2d(MovingBatchNormNd):
    shape = (1, -1, 1, 1)
