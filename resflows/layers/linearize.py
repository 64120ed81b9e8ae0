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

Only the modules listed in ``_HANDLERS`` are supported; :func:`supports` tells whether a branch can be
linearised, and callers fall back to autograd otherwise.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import CLipSwish, Identity, LeakyLSwish, LipschitzCube, LipSwish
from .dense import LipschitzDenseLayer
from .lipschitz import InducedNormConv2d, InducedNormLinear, LopConv2d, LopLinear
from .normalization import MovingBatchNormNd

Tensor = torch.Tensor

__all__ = ["supports", "primal", "tape_vjp", "dual"]


# ------------------------------------------------------------------------------------------------
# Activations: value and derivative from the pre-activation (both in torch ops, so differentiable)
# ------------------------------------------------------------------------------------------------
_INV_11 = 1 / 1.1


def _lipswish_terms(h: Tensor, b: Tensor):
    """s = sigmoid(b h), q = s (1 - s), f = h s / 1.1, f' = (s + b h q) / 1.1, with few passes over memory."""
    bh = h * b
    s = torch.sigmoid(bh)
    q = torch.addcmul(s, s, s, value=-1.0)
    d = torch.addcmul(s, bh, q).mul_(_INV_11)
    return bh, s, q, d


def _lipswish(m: LipSwish, h: Tensor) -> Tuple[Tensor, Tensor]:
    """LipSwish value and derivative (no graph: used by the primal pass)."""
    b = F.softplus(m.beta)
    _, s, _, d = _lipswish_terms(h, b)
    return (h * s).mul_(_INV_11), d


class _DualLipSwish(torch.autograd.Function):
    """(h, t, beta) -> (f(h), f'(h) t) for LipSwish with a hand-written backward: one fused pass instead of
    autograd's generic second-order graph of the element-wise ops. Only (h, t) are saved."""

    @staticmethod
    def forward(ctx, h: Tensor, t: Tensor, beta: Tensor):
        b = F.softplus(beta)
        _, s, _, d = _lipswish_terms(h, b)
        ctx.save_for_backward(h, t, beta)
        return (h * s).mul_(_INV_11), d.mul_(t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor, gdt: Tensor):
        h, t, beta = ctx.saved_tensors
        b = F.softplus(beta)
        bh, s, q, d = _lipswish_terms(h, b)
        # f''(h) = b q (2 + b h (1 - 2 s)) / 1.1;  df'/db = (h / b) f''(h);  df/db = h^2 q / 1.1
        r = torch.addcmul(torch.full_like(s, 2.0), bh, torch.mul(s, -2.0).add_(1.0)).mul_(q).mul_(_INV_11)
        gt = gdt * t
        grad_h = torch.addcmul(gy * d, gt, r, value=float(b))
        grad_t = gdt * d
        grad_b = (gy * h * h * q).sum() * _INV_11 + (gt * h * r).sum()
        grad_beta = (grad_b * torch.sigmoid(beta)).reshape(beta.shape)
        return grad_h, grad_t, grad_beta


def _elu(m: nn.ELU, h: Tensor) -> Tuple[Tensor, Tensor]:
    e = m.alpha * torch.expm1(torch.clamp(h, max=0.0))
    return torch.where(h > 0, h, e), torch.where(h > 0, torch.ones_like(h), e + m.alpha)


def _softplus(m: nn.Softplus, h: Tensor) -> Tuple[Tensor, Tensor]:
    return F.softplus(h, m.beta, m.threshold), torch.where(h * m.beta > m.threshold, torch.ones_like(h), torch.sigmoid(h * m.beta))


def _relu(m: nn.ReLU, h: Tensor) -> Tuple[Tensor, Tensor]:
    return torch.relu(h), (h > 0).to(h.dtype)


def _tanh(m: nn.Tanh, h: Tensor) -> Tuple[Tensor, Tensor]:
    y = torch.tanh(h)
    return y, 1 - y * y


def _lcube(m: LipschitzCube, h: Tensor) -> Tuple[Tensor, Tensor]:
    inside = h.abs() < 1
    return m(h), torch.where(inside, h * h, torch.ones_like(h))


def _leakylswish(m: LeakyLSwish, h: Tensor) -> Tuple[Tensor, Tensor]:
    a = torch.sigmoid(m.alpha)
    y, d = _lipswish(m.swish, h)
    return a * h + (1 - a) * y, a + (1 - a) * d


_ACTIVATIONS: Dict[Type[nn.Module], Callable[[nn.Module, Tensor], Tuple[Tensor, Tensor]]] = {
    LipSwish: _lipswish,
    nn.ELU: _elu,
    nn.Softplus: _softplus,
    nn.ReLU: _relu,
    nn.Tanh: _tanh,
    LipschitzCube: _lcube,
    LeakyLSwish: _leakylswish,
}
_LINEAR = (InducedNormLinear, LopLinear, nn.Linear)
_CONV = (InducedNormConv2d, LopConv2d, nn.Conv2d)


def _cl(x: Tensor) -> Tensor:
    # oneDNN convolutions on CPU are several times faster on channels-last (NHWC) tensors.
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _weight(m: nn.Module) -> Tensor:
    return m.normalized_weight() if hasattr(m, "normalized_weight") else m.weight


def _conv_ok(m: nn.Module) -> bool:
    stride, dilation = m.stride, getattr(m, "dilation", (1, 1))
    groups = getattr(m, "groups", 1)
    k, pad = m.kernel_size, m.padding
    same = all(isinstance(p, int) and 2 * p == kk - 1 for p, kk in zip(pad, k))
    return tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1 and same


def supports(module: nn.Module) -> bool:
    """Whether :func:`primal` / :func:`dual` can linearise this residual branch."""
    from ..model import FCNet  # local import: the model module imports the layers

    if isinstance(module, nn.Sequential):
        return all(supports(m) for m in module)
    if isinstance(module, FCNet):
        return supports(module.nnet)
    if isinstance(module, LipschitzDenseLayer):
        return supports(module.network)
    if isinstance(module, _CONV):
        return _conv_ok(module)
    if isinstance(module, _LINEAR) or isinstance(module, (Identity, CLipSwish, MovingBatchNormNd, nn.Dropout, nn.Dropout2d)):
        return True
    return type(module) in _ACTIVATIONS


def _leaves(module: nn.Module) -> List[nn.Module]:
    from ..model import FCNet

    if isinstance(module, nn.Sequential):
        return [leaf for m in module for leaf in _leaves(m)]
    if isinstance(module, FCNet):
        return [_Flatten()] + _leaves(module.nnet) + [_Unflatten(module.out_shape)]
    return [module]


class _Flatten(nn.Module):
    pass


class _Unflatten(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)


# ------------------------------------------------------------------------------------------------
# Forward with a tape (no graph), and vector-Jacobian products from it
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def primal(module: nn.Module, x: Tensor) -> Tuple[Tensor, List[Tuple[str, Any]]]:
    """``g(x)`` without a graph, and the tape: per layer what its transpose needs (normalised weight,
    activation derivative, reshape) plus the state a recomputation must reuse (batch-norm means used,
    dropout masks)."""
    tape: List[Tuple[str, Any]] = []
    h = x
    for m in _leaves(module):
        if isinstance(m, _Flatten):
            tape.append(("reshape", h.shape))
            h = h.reshape(h.shape[0], -1)
        elif isinstance(m, _Unflatten):
            tape.append(("reshape", h.shape))
            h = h.reshape(h.shape[0], *m.shape)
        elif isinstance(m, _LINEAR):
            w = _weight(m)
            tape.append(("linear", w))
            h = F.linear(h, w, m.bias)
        elif isinstance(m, _CONV):
            w = _weight(m)
            # w^T J through a convolution with the flipped, transposed kernel: the same numbers as
            # conv_transpose2d, but through the (much faster) forward convolution kernels.
            tape.append(("conv", (w.flip(2, 3).transpose(0, 1).contiguous(), m.padding)))
            h = F.conv2d(_cl(h), w, m.bias, 1, m.padding)
        elif isinstance(m, LipschitzDenseLayer):
            h, entry = _dense_primal(m, h)
            tape.append(entry)
        elif isinstance(m, Identity):
            continue
        elif isinstance(m, CLipSwish):
            c = h.shape[1]
            y, d = _lipswish(m.swish, torch.cat([h, -h], 1))
            tape.append(("clipswish", (d / 1.004, c)))
            h = y / 1.004
        elif isinstance(m, MovingBatchNormNd):
            used = m.running_mean.clone()
            h = m(h)  # updates the running mean exactly once
            tape.append(("shift", used))
        elif isinstance(m, (nn.Dropout, nn.Dropout2d)):
            mask = _dropout_mask(m, h)
            tape.append(("mask", mask))
            if mask is not None:
                h = h * mask
        else:
            y, d = _ACTIVATIONS[type(m)](m, h)
            tape.append(("diag", d))
            h = y
    return h, tape


def _dropout_mask(m: nn.Module, h: Tensor):
    if not m.training or m.p == 0:
        return None
    shape = (h.shape[0], h.shape[1]) + (1,) * (h.dim() - 2) if isinstance(m, nn.Dropout2d) else h.shape
    return torch.empty(shape, dtype=h.dtype, device=h.device).bernoulli_(1 - m.p) / (1 - m.p)


@torch.no_grad()
def tape_vjp(tape: List[Tuple[str, Any]], w: Tensor) -> Tensor:
    """``w^T J`` for the Jacobian recorded on the tape."""
    fresh = False  # whether w is a temporary of ours (then multiplications may happen in place)
    for kind, data in reversed(tape):
        if kind == "diag":
            w = w.mul_(data) if fresh else w * data
            fresh = True
        elif kind == "conv":
            flipped, padding = data  # stride 1, 'same' padding: the adjoint keeps the padding
            w = F.conv2d(_cl(w), flipped, None, 1, padding)
            fresh = True
        elif kind == "linear":
            w = w @ data
            fresh = True
        elif kind == "dense":
            w = _dense_vjp(data, w)
            fresh = True
        elif kind == "reshape":
            w = w.reshape(data)
        elif kind == "clipswish":
            d, c = data
            w = w * d
            w = w[:, :c] - w[:, c:]
        elif kind == "mask" and data is not None:
            w = w * data
    return w


def strip_tape(tape: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
    """Keep only what a recomputation must reuse (batch-norm means, dropout masks), freeing the derivative
    caches and weights."""
    return [(k, d if k in ("shift", "mask") else _strip_dense(d) if k == "dense" else None) for k, d in tape]


# ------------------------------------------------------------------------------------------------
# Differentiable forward mode: g(x) and J v in one pass
# ------------------------------------------------------------------------------------------------
def dual(module: nn.Module, x: Tensor, t: Tensor, tape: List[Tuple[str, Any]]) -> Tuple[Tensor, Tensor]:
    """``(g(x), J_g(x) t)`` built with torch ops (differentiable w.r.t. ``x`` and the parameters),
    reusing the batch-norm means and dropout masks of the forward pass recorded on ``tape``."""
    h = x
    i = 0
    for m in _leaves(module):
        if isinstance(m, _Flatten):
            h, t = h.reshape(h.shape[0], -1), t.reshape(t.shape[0], -1)
        elif isinstance(m, _Unflatten):
            h, t = h.reshape(h.shape[0], *m.shape), t.reshape(t.shape[0], *m.shape)
        elif isinstance(m, _LINEAR):
            w = _weight(m)
            h, t = F.linear(h, w, m.bias), F.linear(t, w)
        elif isinstance(m, _CONV):
            w = _weight(m)
            h, t = F.conv2d(_cl(h), w, m.bias, 1, m.padding), F.conv2d(_cl(t), w, None, 1, m.padding)
        elif isinstance(m, LipschitzDenseLayer):
            h, t = _dense_dual(m, h, t, tape[i][1])
        elif isinstance(m, Identity):
            continue
        elif isinstance(m, CLipSwish):
            y, d = _lipswish(m.swish, torch.cat([h, -h], 1))
            h, t = y / 1.004, d * torch.cat([t, -t], 1) / 1.004
        elif isinstance(m, MovingBatchNormNd):
            used = tape[i][1]
            h = h - used.view(*m.shape)
            if m.bias is not None:
                h = h + m.bias.view(*m.shape)
        elif isinstance(m, (nn.Dropout, nn.Dropout2d)):
            mask = tape[i][1]
            if mask is not None:
                h, t = h * mask, t * mask
        elif isinstance(m, LipSwish):
            h, t = _DualLipSwish.apply(h, t, m.beta)
        else:
            y, d = _ACTIVATIONS[type(m)](m, h)
            h, t = y, d * t
        i += 1
    return h, t


# ------------------------------------------------------------------------------------------------
# i-DenseNets: y = concat(eta1 x, eta2 net(x)), so w^T J = eta1 w_x + eta2 (w_net^T J_net) and
# J t = concat(eta1 t, eta2 J_net t). The inner network has its own (nested) tape.
# ------------------------------------------------------------------------------------------------
def _dense_primal(m: LipschitzDenseLayer, h: Tensor) -> Tuple[Tensor, Tuple[str, Any]]:
    eta1, eta2 = m.etas()
    y, sub = primal(m.network, h)
    return torch.cat([eta1 * h, eta2 * y], 1), ("dense", (eta1, eta2, h.shape[1], sub))


def _dense_vjp(data, w: Tensor) -> Tensor:
    eta1, eta2, c, sub = data
    return eta1 * w[:, :c] + eta2 * tape_vjp(sub, w[:, c:])


def _strip_dense(data):
    return (None, None, data[2], strip_tape(data[3]))


def _dense_dual(m: LipschitzDenseLayer, h: Tensor, t: Tensor, data) -> Tuple[Tensor, Tensor]:
    eta1, eta2 = m.etas()  # with a graph: K receives gradients
    y, ty = dual(m.network, h, t, data[3])
    return torch.cat([eta1 * h, eta2 * y], 1), torch.cat([eta1 * t, eta2 * ty], 1)
