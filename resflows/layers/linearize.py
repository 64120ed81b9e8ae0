"""Hand-written linearisation of residual branches: the forward pass with a tape, vector-Jacobian products
from the tape, and a differentiable forward-mode (primal, tangent) pass.

The power series of an iResBlock needs many products ``w^T J`` with the same Jacobian. Through autograd
each one re-runs the generic backward of every activation (several element-wise kernels); here the forward
pass records each activation's derivative once, so a product costs one transposed convolution (or matmul)
per linear layer and one multiplication per activation.

For the Neumann gradient (Chen et al. 2019, eq. 8) the only differentiated quantity is ``u^T J v`` with
fixed ``u`` (the Neumann vector) and ``v`` (the probe). ``dual`` computes ``g(x)`` and ``J v`` together in one
differentiable forward pass (each linear layer applied to the primal and the tangent, each activation
giving ``f(h)`` and ``f'(h) t``), so ``d(u^T J v)`` needs only first-order backpropagation and the block's
graph can be rebuilt in its own backward pass instead of being kept through the whole model.

Dispatch is by exact module type through ``HANDLERS``: a subclass (which may compute something else) is
not linearised, and :func:`supports` sends the whole branch to autograd. Activations take their value and
derivative from :mod:`resflows.layers.activations` (defined there once).

Adding a layer type: ``register(MyLayer, Handler(primal, vjp, dual, keep, ok))``, next to the layer's
class (see ``Handler``; containers call :func:`primal`, :func:`tape_vjp`, :func:`dual` and
:func:`strip_tape` on their children, as ``FCNet``'s registration in ``resflows/layers/fc.py`` does), and a
case in ``tests/layers/test_linearize.py``, whose completeness test fails until there is one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import precision
from .activations import (
    SLOPES,
    CLipSwish,
    CPila,
    CReLU,
    Identity,
    LipSwish,
    clipswish_dual,
    clipswish_value_and_slope,
    cpila_value_and_slope,
    crelu_value_and_slope,
    lipswish_dual,
)
from .lipschitz import InducedNormConv2d, InducedNormLinear, LopConv2d, LopLinear
from .normalization import MovingBatchNorm1d, MovingBatchNorm2d

Tensor = torch.Tensor

__all__ = ["Handler", "HANDLERS", "register", "supports", "primal", "tape_vjp", "dual", "strip_tape", "Tape"]


class Handler(NamedTuple):
    """How one exact module type is linearised.

    * ``primal(m, x) -> (y, data)``: ``y = m(x)`` (called without a graph) and what the transpose needs.
    * ``vjp(data, w, inplace) -> w^T J``; ``inplace``: ``w`` is a temporary of ours and may be overwritten.
    * ``dual(m, x, t, data) -> (m(x), J t)`` with torch ops (differentiable w.r.t. ``x``, ``t`` and the
      parameters); ``data`` has been through ``keep``.
    * ``keep(data)``: what a recomputation must reuse (batch-norm means, dropout masks); the rest is freed.
    * ``ok(m)``: whether this instance can be linearised (e.g. the convolution's geometry).
    """

    primal: Callable[[nn.Module, Tensor], Tuple[Tensor, Any]]
    vjp: Callable[[Any, Tensor, bool], Tensor]
    dual: Callable[[nn.Module, Tensor, Tensor, Any], Tuple[Tensor, Tensor]]
    keep: Callable[[Any], Any] = lambda data: None
    ok: Callable[[nn.Module], bool] = lambda m: True


class Tape(NamedTuple):
    """A module's handler and its recorded data (for containers: the children's tapes)."""

    handler: Handler
    data: Any


HANDLERS: Dict[Type[nn.Module], Handler] = {}


def register(cls: Type[nn.Module], handler: Handler) -> None:
    """Linearise modules of exactly this type with ``handler``."""
    HANDLERS[cls] = handler


def supports(module: nn.Module) -> bool:
    """Whether :func:`primal` / :func:`dual` can linearise this residual branch."""
    handler = HANDLERS.get(type(module))
    return handler is not None and handler.ok(module)


@torch.no_grad()
def primal(module: nn.Module, x: Tensor) -> Tuple[Tensor, Tape]:
    """``g(x)`` without a graph, and the tape: per layer what its transpose needs (normalised weight,
    activation derivative, reshape) plus the state a recomputation must reuse (batch-norm means used,
    dropout masks)."""
    handler = HANDLERS[type(module)]
    y, data = handler.primal(module, x)
    return y, Tape(handler, data)


@torch.no_grad()
def tape_vjp(tape: Tape, w: Tensor, inplace: bool = False) -> Tensor:
    """``w^T J`` for the Jacobian recorded on the tape (``w`` itself is never modified unless ``inplace``)."""
    return tape.handler.vjp(tape.data, w, inplace)


def strip_tape(tape: Tape) -> Tape:
    """Keep only what a recomputation must reuse (batch-norm means, dropout masks), freeing the derivative
    caches and weights."""
    return Tape(tape.handler, tape.handler.keep(tape.data))


def dual(module: nn.Module, x: Tensor, t: Tensor, tape: Tape) -> Tuple[Tensor, Tensor]:
    """``(g(x), J_g(x) t)`` built with torch ops (differentiable w.r.t. ``x`` and the parameters),
    reusing the batch-norm means and dropout masks of the forward pass recorded on ``tape``."""
    return tape.handler.dual(module, x, t, tape.data)


# ------------------------------------------------------------------------------------------------
# Containers
# ------------------------------------------------------------------------------------------------
def _storage(w: Tensor) -> int:
    return w.untyped_storage().data_ptr()


def _chain_vjp(tapes: Sequence[Tape], w: Tensor, inplace: bool) -> Tensor:
    if torch.compiler.is_compiling():  # traced (--compile): no storages to compare, the compiler reuses buffers
        for tape in reversed(tapes):
            w = tape.handler.vjp(tape.data, w, False)
        return w
    caller = _storage(w)  # never write into the caller's memory (views of it included) unless allowed
    for tape in reversed(tapes):
        w = tape.handler.vjp(tape.data, w, inplace or _storage(w) != caller)
    return w


def _seq_primal(m: nn.Sequential, x: Tensor):
    tapes = []
    for child in m:
        x, tape = primal(child, x)
        tapes.append(tape)
    return x, tapes


def _seq_dual(m: nn.Sequential, x: Tensor, t: Tensor, tapes):
    for child, tape in zip(m, tapes):
        x, t = dual(child, x, t, tape)
    return x, t


register(nn.Sequential, Handler(
    primal=_seq_primal,
    vjp=_chain_vjp,
    dual=_seq_dual,
    keep=lambda tapes: [strip_tape(tp) for tp in tapes],
    ok=lambda m: all(supports(child) for child in m),
))


def flattened(inner: Callable[[nn.Module], nn.Module], out_shape: Callable[[nn.Module], Sequence[int]]) -> Handler:
    """Handler of a module computing ``inner(x.reshape(B, -1)).reshape(B, *out_shape)`` (e.g. ``FCNet``)."""

    def _primal(m, x):
        y, tape = primal(inner(m), x.reshape(x.shape[0], -1))
        return y.reshape(y.shape[0], *out_shape(m)), (x.shape, y.shape, tape)

    def _vjp(data, w, inplace):
        in_shape, flat_shape, tape = data
        return tape_vjp(tape, w.reshape(flat_shape), inplace).reshape(in_shape)

    def _dual(m, x, t, data):
        flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
        y, jt = dual(inner(m), flat(x), flat(t), data[2])
        return y.reshape(y.shape[0], *out_shape(m)), jt.reshape(jt.shape[0], *out_shape(m))

    return Handler(_primal, _vjp, _dual, keep=lambda data: (None, None, strip_tape(data[2])), ok=lambda m: supports(inner(m)))


# ------------------------------------------------------------------------------------------------
# Linear maps
# ------------------------------------------------------------------------------------------------
def _weight(m: nn.Module) -> Tensor:
    return m.normalized_weight() if hasattr(m, "normalized_weight") else m.weight


def _cl(x: Tensor) -> Tensor:
    # oneDNN convolutions on CPU are several times faster on channels-last (NHWC) tensors.
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class _LowPrecision(NamedTuple):
    """Tape of a linear map run in a low-precision dtype (:mod:`resflows.layers.precision`): the weight (or
    flipped kernel) already rounded, the Lipschitz factor, the convolution's padding."""

    weight: Tensor
    factor: Optional[Tensor]
    padding: Any = None


def _keep_factor(data):
    # A recomputation reuses the Lipschitz factor of the rounded weight measured in the forward pass.
    return data.factor if isinstance(data, _LowPrecision) else None


def _linear_primal(m, x):
    dtype = precision.current_dtype()
    if dtype is not None:
        w, b, factor = precision.branch_weights(m, dtype)
        return precision.rescale(F.linear(precision.to_compute(x, w.dtype), w), factor, b), _LowPrecision(w, factor)
    w = _weight(m)
    return F.linear(x, w, m.bias), w


def _linear_vjp(weight, w, inplace):
    if isinstance(weight, _LowPrecision):
        return precision.rescale(precision.to_compute(w, weight.weight.dtype) @ weight.weight, weight.factor)
    return w @ weight


def _linear_dual(m, x, t, data):
    dtype = precision.current_dtype()
    if dtype is not None:
        w, b, factor = precision.branch_weights(m, dtype, data if torch.is_tensor(data) else None)
        low = lambda a: precision.to_compute(a, w.dtype)  # noqa: E731  (float32 for the stream's map)
        return precision.rescale(F.linear(low(x), w), factor, b), precision.rescale(F.linear(low(t), w), factor)
    w = _weight(m)
    return F.linear(x, w, m.bias), F.linear(t, w)


def _conv_ok(m: nn.Module) -> bool:
    # Stride 1 and 'same' zero padding: then the adjoint is a convolution with the same padding.
    same = all(isinstance(p, int) and 2 * p == k - 1 for p, k in zip(m.padding, m.kernel_size))
    return (tuple(m.stride) == (1, 1) and tuple(getattr(m, "dilation", (1, 1))) == (1, 1)
            and getattr(m, "groups", 1) == 1 and getattr(m, "padding_mode", "zeros") == "zeros" and same)


def _conv_primal(m, x):
    dtype = precision.current_dtype()
    if dtype is not None:
        w, b, factor = precision.branch_weights(m, dtype)
        y = precision.rescale(F.conv2d(precision.to_compute(x, w.dtype), w, None, 1, m.padding), factor, b)
        return y, _LowPrecision(w.flip(2, 3).transpose(0, 1).contiguous(), factor, m.padding)
    w = _weight(m)
    # w^T J through a convolution with the flipped, transposed kernel: the same numbers as
    # conv_transpose2d, but through the (much faster) forward convolution kernels.
    return F.conv2d(_cl(x), w, m.bias, 1, m.padding), (w.flip(2, 3).transpose(0, 1).contiguous(), m.padding)


def _conv_vjp(data, w, inplace):
    if isinstance(data, _LowPrecision):
        low = precision.to_compute(w, data.weight.dtype)
        return precision.rescale(F.conv2d(low, data.weight, None, 1, data.padding), data.factor)
    flipped, padding = data
    return F.conv2d(_cl(w), flipped, None, 1, padding)


def _conv_dual(m, x, t, data):
    dtype = precision.current_dtype()
    if dtype is not None:
        w, b, factor = precision.branch_weights(m, dtype, data if torch.is_tensor(data) else None)
        low = lambda a: precision.to_compute(a, w.dtype)  # noqa: E731  (float32 for the stream's map)
        return (precision.rescale(F.conv2d(low(x), w, None, 1, m.padding), factor, b),
                precision.rescale(F.conv2d(low(t), w, None, 1, m.padding), factor))
    w = _weight(m)
    return F.conv2d(_cl(x), w, m.bias, 1, m.padding), F.conv2d(_cl(t), w, None, 1, m.padding)


for _cls in (InducedNormLinear, LopLinear, nn.Linear):
    register(_cls, Handler(_linear_primal, _linear_vjp, _linear_dual, keep=_keep_factor))
for _cls in (InducedNormConv2d, LopConv2d, nn.Conv2d):
    register(_cls, Handler(_conv_primal, _conv_vjp, _conv_dual, keep=_keep_factor, ok=_conv_ok))


# ------------------------------------------------------------------------------------------------
# Element-wise maps
# ------------------------------------------------------------------------------------------------
def _diag_vjp(d, w, inplace):
    return w.mul_(d) if inplace else w * d


def _elementwise(value_and_slope, dual_fn=None) -> Handler:
    def _dual(m, x, t, data):
        if dual_fn is not None:
            return dual_fn(m, x, t)
        y, d = value_and_slope(m, x)
        return y, d * t

    # In-place variants would overwrite the caller's input (and torch's in-place ELU has no usable
    # input afterwards): they go to autograd.
    return Handler(value_and_slope, _diag_vjp, _dual, ok=lambda m: not getattr(m, "inplace", False))


for _cls, _vs in SLOPES.items():
    register(_cls, _elementwise(_vs, lipswish_dual if _cls is LipSwish else None))


def _clipswish_vjp(data, w, inplace):
    d, c = data  # J = diag(d) [I; -I]
    w = _diag_vjp(d, w, inplace)
    return w[:, :c] - w[:, c:]


def _clipswish_primal(m, x):
    y, d = clipswish_value_and_slope(m, x)
    return y, (d, x.shape[1])


register(CLipSwish, Handler(_clipswish_primal, _clipswish_vjp, lambda m, x, t, data: clipswish_dual(m, x, t)))
def _concatenated(value_and_slope) -> Handler:
    """Handler of an activation ``f(x) = a([x, -x])`` with Jacobian ``diag(d) [I; -I]`` (CPila, CReLU)."""

    def _primal(m, x):
        y, d = value_and_slope(m, x)
        return y, (d, x.shape[1])

    def _dual(m, x, t, data):
        y, d = value_and_slope(m, x)
        return y, d * torch.cat([t, -t], 1)

    return Handler(_primal, _clipswish_vjp, _dual)


register(CPila, _concatenated(cpila_value_and_slope))
register(CReLU, _concatenated(crelu_value_and_slope))
register(Identity, Handler(lambda m, x: (x, None), lambda data, w, inplace: w, lambda m, x, t, data: (x, t)))


# ------------------------------------------------------------------------------------------------
# Stateful maps: batch-norm shifts and dropout masks are recorded and reused by the recomputation
# ------------------------------------------------------------------------------------------------
def _bn_primal(m, x):
    used = m.running_mean.clone()
    return m(x), used  # the module itself updates the running mean, exactly once


for _cls in (MovingBatchNorm1d, MovingBatchNorm2d):
    register(_cls, Handler(_bn_primal, lambda data, w, inplace: w, lambda m, x, t, used: (m.shift(x, used), t),
                           keep=lambda used: used))


def _dropout_primal(m, x):
    if not m.training or m.p == 0:
        return x, None
    # The module's own draw, applied to ones: its mask (already scaled by 1 / (1 - p)).
    shape = x.shape if type(m) is nn.Dropout else x.shape[:2] + (1,) * (x.dim() - 2)
    mask = m(torch.ones(shape, dtype=x.dtype, device=x.device))
    return x * mask, mask


def _mask_vjp(mask, w, inplace):
    return w if mask is None else _diag_vjp(mask, w, inplace)


def _mask_dual(m, x, t, mask):
    return (x, t) if mask is None else (x * mask, t * mask)


for _cls in (nn.Dropout, nn.Dropout2d):
    register(_cls, Handler(_dropout_primal, _mask_vjp, _mask_dual, keep=lambda mask: mask))
