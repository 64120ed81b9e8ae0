"""The training losses: log-likelihood in bits per dimension (with the dequantisation and padding terms),
and the density / classification / hybrid objectives built on it (:func:`compute_loss`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_bpd_args

if TYPE_CHECKING:
    from .config import TrainConfig
    from .model import ResidualFlow

Tensor = torch.Tensor

__all__ = ["standard_normal_logprob", "padding_logprob", "bits_per_dim", "LossOut", "ModelForward", "compute_loss"]

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """Element-wise log N(z; 0, 1)."""
    return -0.5 * (_LOG_2PI + z * z)


def padding_logprob(x: Tensor, im_dim: int, nvals: int, dist: str = "uniform") -> Tensor:
    """log p(u) of the noise channels ``x[:, im_dim:]`` appended by ``--padding`` (scaled by 1/nvals).
    Uniform padding has log-density 0; Gaussian padding is N(nvals / 2, (nvals / 8)^2) before scaling."""
    u = x[:, im_dim:] * nvals
    if u.shape[1] == 0 or dist == "uniform":
        return x.new_zeros(x.shape[0])
    mean, log_std = nvals / 2, math.log(nvals / 8)
    lp = -0.5 * (_LOG_2PI + 2 * log_std + ((u - mean) / math.exp(log_std)) ** 2)
    return lp.reshape(x.shape[0], -1).sum(1)


def bits_per_dim(z: Tensor, logdet: Tensor, image_shape: Sequence[int], nvals: int, padding: int = 0,
                 logpu: Optional[Tensor] = None, beta: float = 1.0) -> Tensor:
    """Per-example bits/dim ``-log p(x) / (C H W ln 2)`` of the discrete image (the paper's).

    ``log p(x) = log N(z) + beta * logdet - D log(nvals) - log p(u)`` with ``D = H W (C + padding)``: the
    flow's density of the dequantised input, the change of variables to [0, 1] pixels (``-D log nvals``),
    and the padding noise. ``image_shape`` is (C, H, W) of the image without padding channels. Arguments
    that do not fit together (z's size against ``image_shape``, logdet's batch) raise ``ValueError``.
    """
    c, h, w = check_bpd_args(z, logdet, image_shape, nvals, padding, logpu)
    logpz = standard_normal_logprob(z).reshape(z.shape[0], -1).sum(1)
    logpx = logpz + beta * logdet - h * w * (c + padding) * math.log(nvals)
    if logpu is not None:
        logpx = logpx - logpu
    return -logpx / (c * h * w) / math.log(2)


@dataclass
class LossOut:
    """What :func:`compute_loss` returns: the loss to minimise and the terms logged beside it."""
    loss: Tensor
    bpd: Optional[Tensor] = None  # per example
    logpz: Optional[Tensor] = None
    logdet: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    crossent: Optional[Tensor] = None
    logq: Optional[Tensor] = None  # log q(u | x) per example (--var-deq)


class ModelForward(nn.Module):
    """``forward(x, mode)`` over the model's entry points, so DistributedDataParallel wraps one forward:
    'density' -> (z, logdet), 'hybrid' -> (z, logdet, logits), 'classify' -> logits, 'vardeq' -> (z, logdet, log q)
    with the flow applied to ``x`` dequantised by the model's q(u | x) into ``nvals`` bins."""

    def __init__(self, model: "ResidualFlow"):
        super().__init__()
        self.model = model

    def forward(self, x, mode: str = "density", nvals: int = 256):
        if mode == "vardeq":
            y, logq = self.model.dequantize(x, nvals)
            z, logdet = self.model(y)
            return z, logdet, logq
        if mode == "classify":
            return self.model.classify(x)
        if mode == "hybrid":
            return self.model.forward_with_logits(x)
        return self.model(x)


def compute_loss(forward: nn.Module, x: Tensor, y: Tensor, cfg: "TrainConfig", image_shape: Sequence[int], nvals: int,
                 beta: float = 1.0) -> LossOut:
    """The density / classification / hybrid losses of the paper (bits/dim, cross-entropy, their sum).

    ``forward(x, mode)`` is a :class:`ModelForward` (possibly inside DistributedDataParallel).
    """
    out = LossOut(loss=x.new_zeros(()))
    if cfg.task == "classification":
        logits = forward(x, "classify")
        out.logits, out.crossent = logits, F.cross_entropy(logits, y)
        out.loss = out.crossent
        return out
    if cfg.task == "hybrid":
        z, logdet, logits = forward(x, "hybrid")
        out.logits, out.crossent = logits, F.cross_entropy(logits, y)
    elif getattr(cfg, "var_deq", False):
        # The variational bound log p(x + u) - log q(u | x), u ~ q (Flow++ eq. 12): log q enters where the
        # padding noise's density does, and beta anneals it with the log-det (as the Monotone Flows code).
        z, logdet, out.logq = forward(x, "vardeq", nvals)
    else:
        z, logdet = forward(x, "density")
    logpu = padding_logprob(x, image_shape[0], nvals, cfg.padding_dist) if cfg.padding else None
    if out.logq is not None:
        logpu = beta * out.logq
    out.bpd = bits_per_dim(z, logdet, image_shape, nvals, cfg.padding, logpu, beta)
    out.logpz = standard_normal_logprob(z).reshape(z.shape[0], -1).sum(1)
    out.logdet = logdet
    bpd = out.bpd.mean()
    if cfg.task == "density":
        out.loss = bpd
    else:
        if not cfg.scale_dim:
            bpd = bpd * math.prod(image_shape)
        out.loss = bpd + out.crossent / math.log(2)  # cross-entropy in bits
    return out
