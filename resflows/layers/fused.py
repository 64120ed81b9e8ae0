"""LipSwish through autograd with hand-written first and second derivatives.

Where a residual branch runs through autograd (the toy trainer's plain backpropagation through the power
series, ``--neumann-grad False``, exact Jacobians), every series term ``w^T J`` is a ``create_graph``
backward of the branch and the loss then differentiates those products again. Through the generic
element-wise ops of ``x * sigmoid(x * softplus(beta)) / 1.1`` each LipSwish costs ~20 small kernels per
term (the profile in benchmarks/README.md). Here the forward pass computes the slopes ``df/dx`` and
``df/db`` once, as one graph node whose backward holds the closed-form second derivatives; a term's
product is then one multiplication, and the loss's backward one multiplication per term plus one fused
second-derivative pass per activation. Third and higher derivatives still work: the second-derivative
backward is written in differentiable torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["lipswish"]

_SCALE = 1.1  # LipSwish's Lipschitz normalisation (Chen et al. 2019, Sec. 4)


def _will_run(ctx, i: int) -> bool:
    """Whether this backward pass needs the gradient of input ``i``: ``needs_input_grad`` is fixed at the
    forward pass, but a series term ``w^T J`` (``autograd.grad(g, x, w)``) needs only the gradient of x.
    Asks the engine whether the input's node will run; this only works for non-leaf inputs."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    try:
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # an older torch, or a leaf under autograd.grad: assume needed
        return True


class _LipSwishSlopes(torch.autograd.Function):
    """(x, b) -> (df/dx, df/db) element-wise, with s = sigmoid(b x), q = s (1 - s):
    df/dx = (s + b x q) / 1.1 and df/db = x^2 q / 1.1."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor):
        ctx.set_materialize_grads(False)  # a slope nobody used arrives as None: skip its terms
        u = x * b
        s = torch.sigmoid(u)
        q = torch.addcmul(s, s, s, value=-1.0)
        d = torch.addcmul(s, u, q).div_(_SCALE)
        e = (x * x).mul_(q).div_(_SCALE)
        ctx.save_for_backward(x, b)
        return d, e

    @staticmethod
    def backward(ctx, gd: Tensor, ge: Tensor):
        # Second derivatives, with r = q (2 + b x (1 - 2 s)) / 1.1:
        #   d2f/dx2 = b r,  d2f/dx db = x r,  d2f/db2 = x^3 q (1 - 2 s) / 1.1.
        # Plain torch ops (not in place), so that a create_graph backward can differentiate them again.
        x, b = ctx.saved_tensors
        u = x * b
        s = torch.sigmoid(u)
        q = s * (1 - s)
        t = 1 - 2 * s
        r = q * (2 + u * t) / _SCALE
        grad_x = grad_b = None
        if gd is not None:
            grad_x = gd * b * r
            grad_b = (gd * x * r).sum()
        if ge is not None:
            xr = x * r
            grad_x = ge * xr if grad_x is None else grad_x + ge * xr
            gb = (ge * x * x * x * q * t).sum() / _SCALE
            grad_b = gb if grad_b is None else grad_b + gb
        if grad_b is not None:
            grad_b = grad_b.reshape(b.shape)
        return grad_x, grad_b


class _LipSwishValue(torch.autograd.Function):
    """f(x) = x sigmoid(b x) / 1.1 whose backward multiplies by the slopes ``(d, e)`` computed beforehand with
    their graph (a create_graph backward is then differentiable through ``_LipSwishSlopes``).

    The slopes come in as a plain tuple, not as tensor inputs: as inputs, autograd would treat them as a
    path from f back to x and run the slopes' backward (with zeros) in every first-order product."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor, slopes):
        ctx.slopes, ctx.b_shape = slopes, b.shape  # b: one slope for every element
        return (x * torch.sigmoid(x * b)).div_(_SCALE)

    @staticmethod
    def backward(ctx, gy: Tensor):
        d, e = ctx.slopes
        grad_x = gy * d if ctx.needs_input_grad[0] else None
        grad_b = (gy * e).sum().reshape(ctx.b_shape) if _will_run(ctx, 1) else None
        return grad_x, grad_b, None


def lipswish(x: Tensor, beta: Tensor) -> Tensor:
    """LipSwish ``x * sigmoid(x * softplus(beta)) / 1.1``; fused derivatives when a graph is recorded."""
    b = F.softplus(beta)
    if torch.is_grad_enabled() and (x.requires_grad or b.requires_grad):
        return _LipSwishValue.apply(x, b, _LipSwishSlopes.apply(x, b))
    return x * torch.sigmoid(x * b) / _SCALE
