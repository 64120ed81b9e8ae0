"""Activations for Lipschitz-constrained residual branches (all 1-Lipschitz unless stated).

Each element-wise activation's derivative is defined here, next to its value, once: the hand-written
linearisation (:mod:`resflows.layers.linearize`) takes both from ``SLOPES`` and ``lipswish_dual`` (its
tests compare them with autograd through the forward below), and the autograd route differentiates the
same forward.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

# Swish_b(x) = x sigmoid(b x) has Lipschitz constant at most 1.1 for every b > 0 (Chen et al. 2019, Sec. 4).
LIPSWISH_SCALE = 1.1
# [LipSwish(x), LipSwish(-x)] has Lipschitz constant at most 1.004 (Perugachi-Diaz et al. 2021).
CLIPSWISH_SCALE = 1.004

__all__ = [
    "LipSwish",
    "Swish",
    "CLipSwish",
    "Identity",
    "FullSort",
    "MaxMin",
    "LipschitzCube",
    "LeakyLSwish",
    "ACTIVATIONS",
    "ACTIVATION_ALIASES",
    "ACTIVATION_SCRIPTS",
    "activation_choices",
    "make_activation",
    "LIPSWISH_SCALE",
    "CLIPSWISH_SCALE",
    "SLOPES",
    "lipswish_dual",
    "lipswish",
    "clipswish_value_and_slope",
    "Pila",
    "CPila",
    "CReLU",
    "PILA_K",
    "CPILA_SHIFT",
    "CPILA_SCALE",
    "pila",
    "pila_slope",
    "cpila_value_and_slope",
    "crelu_value_and_slope",
]


class LipSwish(nn.Module):
    """LipSwish ``x * sigmoid(x * softplus(beta)) / 1.1`` (Chen et al. 2019, Sec. 4): Swish has
    Lipschitz constant at most 1.1 for any positive slope, so dividing by 1.1 makes it 1-Lipschitz
    while keeping non-vanishing second derivatives (needed by the Neumann gradient)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x: Tensor) -> Tensor:
        return lipswish(x, self.beta)  # fused first and second derivatives when a graph is recorded (below)


def _lipswish(x: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """LipSwish with slope ``b``: ``f(x) = x s / 1.1``, with ``s = sigmoid(b x)`` and ``b x`` (reused by the
    derivatives)."""
    bx = x * b
    s = torch.sigmoid(bx)
    return x * s / LIPSWISH_SCALE, s, bx


def _sigmoid_slope(s: Tensor) -> Tensor:
    return torch.addcmul(s, s, s, value=-1.0)  # s (1 - s) in one kernel


def _lipswish_slope(s: Tensor, bx: Tensor) -> Tensor:
    """f'(x) = (s + b x s (1 - s)) / 1.1."""
    return torch.addcmul(s, bx, _sigmoid_slope(s)) / LIPSWISH_SCALE


def _lipswish_curvature(s: Tensor, bx: Tensor, q: Tensor) -> Tensor:
    """1.1 r = (2 + b x (1 - 2 s)) q with ``q = s (1 - s)``, where f''(x) = b r and d f'(x) / d b = x r.
    In-place on its own temporaries only, so it stays differentiable (``_LipSwishSlopes.backward``)."""
    return torch.mul(s, -2.0).add_(1.0).mul_(bx).add_(2.0).mul_(q)


def _lipswish_value_and_slope(m: "LipSwish", x: Tensor) -> Tuple[Tensor, Tensor]:
    y, s, bx = _lipswish(x, F.softplus(m.beta))
    return y, _lipswish_slope(s, bx)


class _LipSwishDual(torch.autograd.Function):
    """(x, t, beta) -> (f(x), f'(x) t) with a hand-written backward: one fused pass instead of autograd's
    generic second-order graph of the element-wise ops. Only (x, t, beta) are saved."""

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, beta: Tensor):
        y, s, bx = _lipswish(x, F.softplus(beta))
        ctx.save_for_backward(x, t, beta)
        return y, _lipswish_slope(s, bx).mul_(t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor, gdt: Tensor):
        # The formulas of _lipswish_slope / _lipswish_curvature, arranged for the fewest full-size passes
        # (benchmarks/README.md measures why): s (1 - s) once, 1/1.1 folded into scalars where it can be,
        # in-place updates of temporaries, and the beta gradient as one dot product.
        x, t, beta = ctx.saved_tensors
        b = F.softplus(beta)
        bx = x * b
        s = torch.sigmoid(bx)
        q = _sigmoid_slope(s)  # s (1 - s)
        d = torch.addcmul(s, bx, q).div_(LIPSWISH_SCALE)  # f'(x)
        r = _lipswish_curvature(s, bx, q)  # 1.1 r
        gtr = torch.mul(gdt, t).mul_(r)  # gdt t 1.1 r
        # gy f' + gdt t f'' (f'' = b r), with b a tensor: a host number would be a device synchronisation
        grad_x = torch.addcmul(gy * d, gtr, b / LIPSWISH_SCALE)
        grad_t = gdt * d
        # df/db = x^2 q / 1.1 and df'/db = x r: sum(gy x^2 q / 1.1 + gt x r) = x . (gy x q + gt 1.1 r) / 1.1
        acc = (gy * q).mul_(x).add_(gtr)
        grad_b = torch.dot(acc.reshape(-1), x.reshape(-1)) / LIPSWISH_SCALE
        grad_beta = (grad_b * torch.sigmoid(beta)).reshape(beta.shape)  # d softplus / d beta = sigmoid
        return grad_x, grad_t, grad_beta


def lipswish_dual(m: "LipSwish", x: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """``(f(x), f'(x) t)`` for a LipSwish module, differentiable w.r.t. ``x``, ``t`` and ``beta``."""
    return _LipSwishDual.apply(x, t, m.beta)


# -- The autograd route: LipSwish whose backward uses the slopes above, computed once in the forward pass --
# Where a branch runs through autograd (the toy trainer's backpropagation through the power series,
# --neumann-grad False, exact Jacobians), each series term w^T J is a create_graph backward of the branch
# and the loss differentiates those products again. Through the generic element-wise ops each LipSwish
# costs many small kernels per term (measured in benchmarks/README.md); here a term's product is one multiplication and
# the second-order backward one fused pass. Higher derivatives still work (plain torch ops throughout).
def _will_run(ctx, i: int) -> bool:
    """Whether this backward needs the gradient of input ``i``: ``needs_input_grad`` is fixed at the forward
    pass, but a series term ``autograd.grad(g, x, w)`` needs only d/dx. Asks the engine whether the input's
    node will run (non-leaf inputs only); assume it does where torch cannot say."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    # A private torch API, the only way to ask inside a backward which inputs the current autograd.grad call
    # needs. Without it (renamed or dropped by torch) the beta gradient is computed in every series term:
    # results unchanged, the toy trainer's products slower. tests/test_private_torch.py fails loudly then.
    try:
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


class _LipSwishSlopes(torch.autograd.Function):
    """(x, b) -> (df/dx, df/db) element-wise; the backward holds the closed-form second derivatives."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor):
        ctx.set_materialize_grads(False)  # a slope nobody used arrives as None: skip its terms
        _, s, bx = _lipswish(x, b)
        ctx.save_for_backward(x, b)
        return _lipswish_slope(s, bx), x * x * _sigmoid_slope(s) / LIPSWISH_SCALE

    @staticmethod
    def backward(ctx, gd: Tensor, ge: Tensor):
        # d2f/dx2 = b r, d2f/dx db = x r, d2f/db2 = x^3 q (1 - 2 s) / 1.1 (differentiable again).
        x, b = ctx.saved_tensors
        bx = x * b
        s = torch.sigmoid(bx)
        q = _sigmoid_slope(s)
        r = _lipswish_curvature(s, bx, q) / LIPSWISH_SCALE
        grad_x = grad_b = None
        if gd is not None:
            grad_x = gd * b * r
            grad_b = (gd * x * r).sum()
        if ge is not None:
            xr = x * r
            grad_x = ge * xr if grad_x is None else grad_x + ge * xr
            gb = (ge * x * x * x * q * (1 - 2 * s)).sum() / LIPSWISH_SCALE
            grad_b = gb if grad_b is None else grad_b + gb
        if grad_b is not None:
            grad_b = grad_b.reshape(b.shape)
        return grad_x, grad_b


class _LipSwishValue(torch.autograd.Function):
    """f(x) whose backward multiplies by the slopes (d, e) computed beforehand with their graph, so a
    create_graph backward is differentiable through ``_LipSwishSlopes``. The slopes come as a plain tuple,
    not tensor inputs: as inputs, autograd would run their backward (with zeros) in every first-order product."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor, slopes):
        ctx.slopes, ctx.b_shape = slopes, b.shape
        return _lipswish(x, b)[0]

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
    return _lipswish(x, b)[0]


Swish = LipSwish  # the paper's name for it (`--act swish`)


class CLipSwish(nn.Module):
    """Concatenated LipSwish ``[LipSwish(x), LipSwish(-x)] / 1.004`` (Perugachi-Diaz et al., Invertible
    DenseNets, 2021): doubles the channels (dim 1) and stays 1-Lipschitz."""

    out_multiplier = 2

    def __init__(self):
        super().__init__()
        self.swish = LipSwish()

    def forward(self, x: Tensor) -> Tensor:
        return self.swish(torch.cat([x, -x], 1)) / CLIPSWISH_SCALE


def clipswish_value_and_slope(m: CLipSwish, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(f(x), d)`` with Jacobian ``diag(d) [I; -I]``: the LipSwish slope at ``[x, -x]`` over 1.004."""
    y, d = _lipswish_value_and_slope(m.swish, torch.cat([x, -x], 1))
    return y / CLIPSWISH_SCALE, d / CLIPSWISH_SCALE


def clipswish_dual(m: CLipSwish, x: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """``(f(x), J t)`` for CLipSwish through the fused LipSwish pass."""
    y, jt = lipswish_dual(m.swish, torch.cat([x, -x], 1), torch.cat([t, -t], 1))
    return y / CLIPSWISH_SCALE, jt / CLIPSWISH_SCALE


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


class LeakyLSwish(nn.Module):
    """``a x + (1 - a) LipSwish(x)`` with ``a = sigmoid(alpha)`` learned (``alpha`` starts at -3, a ~ 0.05):
    the i-DenseNets fork's ``--act LeakyLSwish``. A convex combination of 1-Lipschitz maps, so 1-Lipschitz;
    its slope stays >= a, so the gradient never vanishes."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([-3.0]))
        self.swish = LipSwish()

    def forward(self, x: Tensor) -> Tensor:
        a = torch.sigmoid(self.alpha)
        return a * x + (1 - a) * self.swish(x)


def _leakylswish_value_and_slope(m: LeakyLSwish, x: Tensor) -> Tuple[Tensor, Tensor]:
    a = torch.sigmoid(m.alpha)
    y, d = _lipswish_value_and_slope(m.swish, x)
    return a * x + (1 - a) * y, a + (1 - a) * d


# -- Pila and its concatenated form CPila (Monotone Flows, Ahn et al. 2022) ---------------------------------
# P(z) = z for z > 0 and z (k^2 z^2 / 2 - k z + 1) e^{kz} below: C^2 at 0 (P(0) = 0, P'(0) = 1, P''(0) = 0),
# P'(z) = (k^3 z^3 / 2 + k^2 z^2 / 2 - k z + 1) e^{kz} for z <= 0, which rises from its minimum -19 e^-4 (at kz = -4)
# to 1, so Lip(P) = 1. The exponent is clamped to [-200, 0]: e^{kz} is never formed for large z (it would overflow).
PILA_K = 5.0
CPILA_SHIFT = 0.2
# sup_x sqrt(P'(x - 0.2)^2 + P'(-x - 0.2)^2) is about 1.0588 (at x = +-0.6): dividing by 1.06 makes CPila 1-Lipschitz.
CPILA_SCALE = 1.06


# Below z = -40 (kz = -200) P and its derivatives are below 1e-80: the branch is evaluated at -40 there, so that
# (kz)^3 cannot overflow in float32.
_PILA_FLOOR = -40.0


def _nonpositive(z: Tensor) -> Tensor:
    # z where z <= 0, else 0; unlike clamp(max=0), the derivative at z = 0 is 1 (so autograd gives P'(0) = 1).
    return torch.where(z > 0, torch.zeros_like(z), z).clamp(min=_PILA_FLOOR)


def pila(z: Tensor) -> Tensor:
    """Pila ``P(z)`` with k = 5 in plain torch ops (differentiable to any order)."""
    zn = _nonpositive(z)
    kz = PILA_K * zn
    neg = zn * (0.5 * kz * kz - kz + 1.0) * torch.exp(kz)
    return torch.where(z > 0, z, neg)


def pila_slope(z: Tensor) -> Tensor:
    """``P'(z)`` in plain torch ops (differentiable again: the dual passes need ``P''``)."""
    kz = PILA_K * _nonpositive(z)
    neg = (0.5 * kz * kz * kz + 0.5 * kz * kz - kz + 1.0) * torch.exp(kz)
    return torch.where(z > 0, torch.ones_like(z), neg)


class Pila(nn.Module):
    """Pila ``P(x)`` (k = 5), element-wise and 1-Lipschitz; no parameters (the fork's ``--act pila``)."""

    def forward(self, x: Tensor) -> Tensor:
        return pila(x)


class CPila(nn.Module):
    """Concatenated Pila ``[P(x - 0.2), P(-x - 0.2)] / 1.06`` along dim 1 (Monotone Flows' ``--act CPila``):
    doubles the channels, 1-Lipschitz (the supremum of its Jacobian's row norms is about 0.9989); no parameters,
    so no state_dict keys."""

    out_multiplier = 2

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([pila(x - CPILA_SHIFT), pila(-x - CPILA_SHIFT)], 1) / CPILA_SCALE


def cpila_value_and_slope(m: CPila, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(f(x), d)`` with Jacobian ``diag(d) [I; -I]``: ``d = [P'(x - 0.2), P'(-x - 0.2)] / 1.06``."""
    z = torch.cat([x - CPILA_SHIFT, -x - CPILA_SHIFT], 1)
    return pila(z) / CPILA_SCALE, pila_slope(z) / CPILA_SCALE


class CReLU(nn.Module):
    """Concatenated ReLU ``[relu(x), relu(-x)]`` along dim 1: doubles the channels, 1-Lipschitz, no parameters."""

    out_multiplier = 2

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.relu(x), F.relu(-x)], 1)


def crelu_value_and_slope(m: CReLU, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(f(x), d)`` with Jacobian ``diag(d) [I; -I]``: ``d = [x > 0, x < 0]``."""
    z = torch.cat([x, -x], 1)
    return F.relu(z), (z > 0).to(z.dtype)


def _pila_value_and_slope(m: Pila, x: Tensor) -> Tuple[Tensor, Tensor]:
    return pila(x), pila_slope(x)


# Derivatives of torch's element-wise activations, from the input x and torch's own value y = f(x).
# Each is used for the exact type only: a subclass may compute something else (and then falls back to
# autograd). In-place variants are not linearised (see linearize.supports).
def _elu_slope(m: nn.ELU, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(x > 0, torch.ones_like(y), y + m.alpha)  # alpha (e^x - 1) + alpha = alpha e^x


def _softplus_slope(m: nn.Softplus, x: Tensor, y: Tensor) -> Tensor:
    bx = x * m.beta  # torch returns x itself above the threshold
    return torch.where(bx > m.threshold, torch.ones_like(y), torch.sigmoid(bx))


def _relu_slope(m: nn.ReLU, x: Tensor, y: Tensor) -> Tensor:
    return (x > 0).to(y.dtype)


def _tanh_slope(m: nn.Tanh, x: Tensor, y: Tensor) -> Tensor:
    return 1 - y * y


def _lcube_slope(m: LipschitzCube, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(x.abs() < 1, x * x, torch.ones_like(y))


def _from_value(slope: Callable[[nn.Module, Tensor, Tensor], Tensor]):
    def value_and_slope(m: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
        y = m(x)
        return y, slope(m, x, y)

    return value_and_slope


# Exact type -> value_and_slope(module, x) = (f(x), f'(x)), both differentiable (torch ops).
SLOPES: Dict[Type[nn.Module], Callable[[nn.Module, Tensor], Tuple[Tensor, Tensor]]] = {
    LipSwish: _lipswish_value_and_slope,
    nn.ELU: _from_value(_elu_slope),
    nn.Softplus: _from_value(_softplus_slope),
    nn.ReLU: _from_value(_relu_slope),
    nn.Tanh: _from_value(_tanh_slope),
    LipschitzCube: _from_value(_lcube_slope),
    LeakyLSwish: _leakylswish_value_and_slope,
    Pila: _pila_value_and_slope,
}

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
    "leakylswish": LeakyLSwish,
    "pila": Pila,
    "cpila": CPila,
    "crelu": CReLU,
}

# The command lines that offer each name as an `--act` choice ("img": train_img.py, "toy": train_toy.py): the
# paper's choices for each script, plus the i-DenseNets and Monotone Flows forks' (CPila also for the toy). The Python API takes any name of
# ACTIVATIONS; a name missing here is offered by neither command line.
ACTIVATION_SCRIPTS = {
    "softplus": ("img",), "elu": ("img", "toy"), "swish": ("img", "toy"), "lcube": ("img", "toy"), "identity": ("img",),
    "relu": ("img", "toy"), "tanh": ("toy",), "selu": ("toy",), "fullsort": ("toy",), "maxmin": ("toy",),
    "clipswish": ("img",), "leakylswish": ("img",), "pila": ("img",), "cpila": ("img", "toy"), "crelu": ("img",),
}


def activation_choices(script: str) -> Tuple[str, ...]:
    """The ``--act`` choices of ``train_img.py`` (``"img"``) or ``train_toy.py`` (``"toy"``), in the order of
    ``ACTIVATIONS``."""
    return tuple(name for name in ACTIVATIONS if script in ACTIVATION_SCRIPTS.get(name, ()))


# The i-DenseNets and Monotone Flows forks' spellings of `--act` values.
ACTIVATION_ALIASES = {"CLipSwish": "clipswish", "LeakyLSwish": "leakylswish", "CPila": "cpila", "CReLU": "crelu"}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (see ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}") from None
