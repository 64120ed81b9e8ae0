"""Reduced-precision residual branches: the convolutions and linear layers of ``g`` in bfloat16, the rest in
float32.

Inside :func:`branch_dtype` (``with branch_dtype(torch.bfloat16): ...``, set by the trainers for the
forward and backward pass of a training step under ``--precision bf16``) every linear map of a residual
branch takes its input rounded to bfloat16 and multiplies with its weight in bfloat16; its output comes back
in float32 (bias added there). That holds for the primal pass, the series' vector-Jacobian products and the
forward-mode pass of the linearised path (:mod:`resflows.layers.linearize`) and for the module forwards the
autograd route differentiates. Everything else stays float32: activations and their derivatives, batch
norms, the residual stream ``x + g(x)``, the probe, the dot products and sums of the series, the log-det.
The parameters stay float32 (the cast is part of the graph, so their gradients are float32 too).

Lipschitz safety: rounding the normalised weight ``W`` to bfloat16 moves each entry by up to 2^-8 of
itself, which can raise the operator norm above ``coeff``. :func:`branch_weights` measures the norms of the
rounded and of the float32 weight the way the layer measures its own (``norm_of``: a few power steps from the
stored vectors, or the exact closed form) and returns a float32 factor ``min(1, max(coeff, norm32) / norm)``
that the layer applies to its float32 output (and to its vector-Jacobian products). The map actually used is
then ``factor * float(round(W))``, whose measured norm is at most ``max(coeff, norm32)``: rounding adds
nothing to the bound float32 training has. (The float32 map itself exceeds ``coeff`` by what its lagging
power estimate misses, up to 2% in the layers of the reference model after 200 steps; pulling the bf16 map
down to ``coeff`` instead changed those layers by as much and moved that model's ``z`` by 10%.) Rescaling
inside bfloat16 would round again. The weights are cast once per pass (the tape keeps the cast for every series term).

The branch's last linear map, the one that writes into the residual stream (tagged ``writes_stream`` by
:class:`~resflows.layers.iresblock.iResBlock`), stays float32 (:func:`keeps_float32`): input, weight and
output. Its output is ``g(x)`` itself, unaveraged by any later layer, and a bfloat16 product rounds it to 8
bits even with a 16-bit weight (the convolution's output has its inputs' dtype). With it in bfloat16 the
gradients of the reference configuration's ActNorm scales moved by 4-5% (relative) at initialisation. It is
the narrowest layer of the branch (out: the stream's 1-12 channels at the paper's sizes, 15-26% of the
branch's multiply-adds), which gains least from bfloat16.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["branch_dtype", "current_dtype", "branch_weights", "applied_weight", "keeps_float32", "mark_stream_output", "to_compute",
           "lowp_linear", "lowp_conv2d", "rescale"]

_DTYPE: Optional[torch.dtype] = None  # None: float32 branches (the default)


@contextlib.contextmanager
def branch_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Run the residual branches' linear maps in ``dtype`` (``None`` or float32: full float32) inside."""
    global _DTYPE
    saved = _DTYPE
    _DTYPE = None if dtype in (None, torch.float32) else dtype
    try:
        yield
    finally:
        _DTYPE = saved


def current_dtype() -> Optional[torch.dtype]:
    """The branches' compute dtype, or None for float32."""
    return _DTYPE


def to_compute(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in the compute dtype (channels-last for feature maps: oneDNN's fast layout on CPU)."""
    if x.dim() == 4:
        return x.to(dtype=dtype, memory_format=torch.channels_last)
    return x.to(dtype)


def keeps_float32(m: nn.Module) -> bool:
    """Whether ``m`` runs in float32 inside :func:`branch_dtype`: the branch's last linear map, into the stream."""
    return getattr(m, "writes_stream", False)


def mark_stream_output(branch: nn.Module) -> None:
    """Tag the last linear map of a residual branch (in module order) as the one that :func:`keeps_float32`."""
    maps = [m for m in branch.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) or hasattr(m, "normalized_weight")]
    if maps:
        maps[-1].writes_stream = True


def branch_weights(m: nn.Module, dtype: torch.dtype, factor: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(weight, bias, factor)`` of a linear map of a residual branch for this pass: the normalised weight
    rounded to ``dtype`` (differentiable, the cast included; float32 for a map that :func:`keeps_float32`),
    the float32 bias, and
    the float32 factor of shape ``[1]`` that keeps the rounded map within ``coeff`` (None for layers without a
    Lipschitz bound). A ``factor`` measured earlier in the same step (same weights) is reused, not measured
    again."""
    w = m.normalized_weight() if hasattr(m, "normalized_weight") else m.weight
    if keeps_float32(m):
        return w, m.bias, None
    low = w.to(dtype)
    if factor is None and hasattr(m, "norm_of"):
        with torch.no_grad():
            norm = m.norm_of(low.detach().float())
            # Undo only what rounding added: the float32 layer's own norm (measured the same way) may sit above
            # coeff while its power estimate lags, and float32 training keeps that map; shrinking to coeff here
            # moved z of a trained model by 10%.
            bound = torch.clamp(m.norm_of(w.detach().float()), min=m.coeff)
            factor = torch.clamp(bound / norm, max=1.0).reshape(1).float()  # in (0, 1]; a tensor, no host read
    return low, m.bias, factor


def applied_weight(m: nn.Module, dtype: torch.dtype) -> Tensor:
    """The float32 weight ``m`` applies inside :func:`branch_dtype` (``dtype``): ``factor * float(round(W))``
    (``W`` for a map that :func:`keeps_float32`). For tests and checks; no gradient."""
    with torch.no_grad():
        w, _, factor = branch_weights(m, dtype)
        return w.float() * factor if factor is not None else w.float()


def rescale(y: Tensor, factor: Optional[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """``factor * y + bias`` in float32 from a low-precision ``y`` (one fused kernel)."""
    if bias is not None:
        b = bias.reshape(1, -1, *([1] * (y.dim() - 2)))
        return torch.addcmul(b, y, factor) if factor is not None else b + y  # [1, C, ...] float32: promotes y
    return y * factor if factor is not None else y.float()


def lowp_linear(m: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``m(x)`` with the multiplication in ``dtype``, the output in float32."""
    w, b, factor = branch_weights(m, dtype)
    return rescale(F.linear(to_compute(x, w.dtype), w), factor, b)


def lowp_conv2d(m: nn.Module, x: Tensor, dtype: torch.dtype, stride=1, padding=0) -> Tensor:
    """``m(x)`` for a convolution with the convolution in ``dtype``, the output in float32."""
    w, b, factor = branch_weights(m, dtype)
    return rescale(F.conv2d(to_compute(x, w.dtype), w, None, stride, padding), factor, b)
