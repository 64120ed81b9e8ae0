"""Log-likelihood in bits per dimension, with the dequantisation and padding terms."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .checks import check_bpd_args

Tensor = torch.Tensor

__all__ = ["standard_normal_logprob", "padding_logprob", "bits_per_dim"]

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
    """Per-example bits/dim ``-log p(x) / (C H W ln 2)`` of the discrete image (SPEC section 1).

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
