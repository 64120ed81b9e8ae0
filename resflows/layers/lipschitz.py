"""Lipschitz-normalised linear and convolution layers.

Every weight ``W`` used inside a residual branch is rescaled to ``W / max(1, sigma / coeff)`` where
``sigma`` estimates the induced operator norm ``||W||_{p -> q}`` (``p`` = domain, ``q`` = codomain) of
the *whole* linear map: for a k x k convolution that is the operator on the full feature map, so the
power-method vectors ``u`` (codomain side) and ``v`` (domain side) span ``C * H * W`` (Residual Flows,
Sec. 3.4; the generalised power method of Higham / QETLAB's InducedMatrixNorm; Behrmann et al. 2019).

The power iterations run outside the forward pass, in ``update_lipschitz`` after each optimiser step,
warm-started from the stored ``u``, ``v``. The forward pass computes ``sigma = u^T W v`` with the stored
vectors, so the gradient flows through ``sigma`` into ``W``.

When the domain is 1 or the codomain is infinity the operator norm has a closed form (largest column
q-norm, largest row dual-norm), used by ``LopLinear`` / ``LopConv2d`` instead of power iterations.

This module holds the layer classes; the norm arithmetic is in :mod:`resflows.layers.norms` and the
lock-step scheduler of the power iterations in :mod:`resflows.layers.power`.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init

from . import precision
from .norms import INF, Order, as_order, asym_squash, closed_form_setting, has_closed_form, normalize_u, normalize_v
from .power import (
    INIT_POWER_ITERATIONS,
    INIT_RESTARTS,
    INIT_TOLERANCE,
    MAX_POWER_ITERATIONS,
    ROUNDED_NORM_STEPS,
    update_lipschitz,
)

Tensor = torch.Tensor

__all__ = [
    "LipschitzMap",
    "InducedNorm",
    "InducedNormLinear",
    "InducedNormConv2d",
    "LopLinear",
    "LopConv2d",
    "get_linear",
    "get_conv2d",
    "lipschitz_layers",
    "norm_order_gradients",
    "POWER_ITERATION_BUFFERS",
    "power_buffers",
    "update_lipschitz",
]

# Buffers holding the power method's state (vectors and the sigma estimate): they belong to the weights they
# were computed for, so an EMA copy keeps its own and re-estimates them instead of copying the model's.
POWER_ITERATION_BUFFERS = ("u", "v", "scale")

# zero_init divides the initial weight by this: a near-identity residual branch (exact zeros would leave
# the power method nothing to converge to).
ZERO_INIT_SHRINK = 1000


class LipschitzMap(nn.Module):
    """Base of the normalised layers: norm orders, weight set-up, sigma, normalised weight, Lipschitz update.

    Subclasses call :meth:`_build` from ``__init__`` after setting their sizes, and define ``_weight_shape``,
    ``sigma`` and ``_init_estimate``.
    """

    coeff: float
    weight: Tensor
    iterative = False  # has power-method vectors u, v (see resflows.layers.power)
    batchable = False  # a 2 -> 2 norm of the plain matrix weight.reshape(out, -1): batched power steps

    def _build(self, weight_shape: Sequence[int], bias: bool, coeff: float, domain: Order, codomain: Order,
               zero_init: bool, **buffers: Tensor) -> None:
        """Orders, weight, bias, PyTorch's default initialisation, ``buffers`` then ``scale``, then the first
        sigma estimate. The order of assignment fixes the paper's state_dict key order."""
        self.coeff = coeff
        # Assigned before the weight so learnable orders come first in state_dict (paper key order).
        self.domain = as_order(domain, "domain")
        self.codomain = as_order(codomain, "codomain")
        self.weight = nn.Parameter(torch.empty(*weight_shape))
        self.bias = nn.Parameter(torch.empty(weight_shape[0])) if bias else None
        self.reset_parameters(zero_init)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.register_buffer("scale", torch.tensor(0.0))
        self._init_estimate()

    def reset_parameters(self, zero_init: bool = False) -> None:
        """PyTorch's default initialisation of nn.Linear / nn.Conv2d; ``zero_init`` shrinks the weight."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)
        if zero_init:
            with torch.no_grad():
                self.weight.div_(ZERO_INIT_SHRINK)

    def _init_estimate(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # -- norm orders -------------------------------------------------------------------------
    @property
    def learnable_orders(self) -> bool:
        return isinstance(self.domain, nn.Parameter)

    def orders(self) -> Tuple[Order, Order]:
        """(domain, codomain): floats, or tensors when the orders are learned."""
        domain = asym_squash(self.domain) if torch.is_tensor(self.domain) else self.domain
        codomain = asym_squash(self.codomain) if torch.is_tensor(self.codomain) else self.codomain
        return domain, codomain

    def _detached_orders(self):
        d, c = self.orders()
        d = d.detach() if torch.is_tensor(d) else d
        c = c.detach() if torch.is_tensor(c) else c
        return d, c

    def norm_orders(self) -> Tuple[float, float]:
        """(domain, codomain) as plain floats, for logging."""
        d, c = self._detached_orders()
        return float(d), float(c)

    # -- the linear map ------------------------------------------------------------------------
    def sigma(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def normalized_weight(self) -> Tensor:
        """W / max(1, sigma / coeff); differentiable through sigma."""
        return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)

    def norm_of(self, weight: Tensor) -> Tensor:  # pragma: no cover - interface
        """The norm this layer bounds by ``coeff``, of another weight of its shape (e.g. the normalised weight
        rounded to bfloat16), measured as the layer measures its own: a 0-d tensor, no graph needed."""
        raise NotImplementedError

    def lipschitz_constant(self) -> float:
        """Lipschitz bound of the normalised layer: min(sigma, coeff), from the stored estimate."""
        return min(float(self.scale), self.coeff)

    # -- power iterations (no-ops for closed-form layers) ----------------------------------------
    def power_step(self, atol: Optional[float] = None, rtol: Optional[float] = None) -> Optional[Tensor]:
        return None

    @torch.no_grad()
    def refresh_scale(self) -> None:
        self.scale.copy_(self.sigma().detach())

    @torch.no_grad()
    def update_lipschitz(self, n_iterations=None, atol=None, rtol=None, max_iterations=MAX_POWER_ITERATIONS) -> int:
        """Run the power method on this layer alone; returns the iterations used."""
        return update_lipschitz([self], n_iterations, atol, rtol, max_iterations)


class _LinearMap:
    """The linear-layer half of a normalised layer: ``[out, in]`` weight, ``F.linear``."""

    in_features: int
    out_features: int

    def _weight_shape(self) -> Tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        dtype = precision.current_dtype()
        if dtype is not None:
            return precision.lowp_linear(self, x, dtype)
        return F.linear(x, self.normalized_weight(), self.bias)


def _pair(x) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)  # type: ignore[return-value]


class _ConvMap:
    """The convolution half of a normalised layer: geometry over a fixed feature map, ``F.conv2d``."""

    in_channels: int
    out_channels: int

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, spatial_dims) -> None:
        """Output size and transpose padding of a 2-D convolution over a fixed feature map."""
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        if spatial_dims is None:
            if self.kernel_size != (1, 1):
                raise ValueError(
                    "spatial_dims=(H, W) is required for a k x k normalised convolution: its operator norm "
                    "is taken over the whole feature map"
                )
            spatial_dims = (1, 1)
        self.in_hw = tuple(int(s) for s in spatial_dims)
        self.out_hw = tuple(
            (self.in_hw[i] + 2 * self.padding[i] - self.kernel_size[i]) // self.stride[i] + 1 for i in range(2)
        )
        self.output_padding = tuple(
            self.in_hw[i] - ((self.out_hw[i] - 1) * self.stride[i] - 2 * self.padding[i] + self.kernel_size[i])
            for i in range(2)
        )

    def _weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        dtype = precision.current_dtype()
        if dtype is not None:
            return precision.lowp_conv2d(self, x, dtype, self.stride, self.padding)
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding)


class InducedNorm(LipschitzMap):
    """Generalised power method on buffers ``u`` (codomain side) and ``v`` (domain side)."""

    iterative = True

    def _operator_shape(self) -> Tuple[int, int]:  # pragma: no cover - interface
        """(length of u, length of v): the operator's output and input dimensions."""
        raise NotImplementedError

    @property
    def _is_matrix(self) -> bool:
        """The operator is ``weight.reshape(out, -1)`` itself (linear layers, 1x1 convolutions)."""
        return True

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        return self._is_matrix and not self.learnable_orders and (self.domain, self.codomain) == (2.0, 2.0)

    def _init_estimate(self) -> None:
        n_out, n_in = self._operator_shape()
        domain, codomain = self._detached_orders()
        with torch.no_grad():
            u = normalize_u(self.weight.new_empty(n_out).normal_(0, 1), codomain)
            v = normalize_v(self.weight.new_empty(n_in).normal_(0, 1), domain)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self._converge_from_restarts()

    @torch.no_grad()
    def _converge_from_restarts(self, restarts: int = INIT_RESTARTS) -> None:
        # The p != 2 power method can stop at a local maximum: keep the best of a few random starts.
        if self.weight.is_meta:  # built on the meta device to check shapes only: there is nothing to iterate on
            return
        update_lipschitz([self], None, INIT_TOLERANCE, INIT_TOLERANCE, max_iterations=INIT_POWER_ITERATIONS)
        d, c = self.norm_orders()
        if d == 2 and c == 2:
            return
        best = (float(self.scale), self.u.clone(), self.v.clone())
        domain, codomain = self._detached_orders()
        for _ in range(restarts):
            self.u.copy_(normalize_u(torch.randn_like(self.u), codomain))
            self.v.copy_(normalize_v(torch.randn_like(self.v), domain))
            update_lipschitz([self], None, INIT_TOLERANCE, INIT_TOLERANCE, max_iterations=INIT_POWER_ITERATIONS)
            if float(self.scale) > best[0]:
                best = (float(self.scale), self.u.clone(), self.v.clone())
        self.u.copy_(best[1])
        self.v.copy_(best[2])
        self.refresh_scale()

    def _matvec(self, weight: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _rmatvec(self, weight: Tensor, u: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sigma(self) -> Tensor:
        # The stored vectors, also with learned orders (as the paper): the orders get their gradient from
        # one_step_sigma, a separate objective, not from the loss.
        return torch.dot(self.u, self._matvec(self.weight, self.v))

    def norm_of(self, weight: Tensor, steps: int = ROUNDED_NORM_STEPS) -> Tensor:
        # A few power steps on ``weight`` from the stored vectors (left untouched): the rounded weight's top
        # singular vectors differ from the float32 weight's, and u^T W' v at the old ones underestimates its norm.
        domain, codomain = self._detached_orders()
        u, v = self.u, self.v
        for _ in range(steps):
            u = normalize_u(self._matvec(weight, v), codomain)
            v = normalize_v(self._rmatvec(weight, u), domain)
        return torch.dot(u, self._matvec(weight, v))

    def one_step_sigma(self) -> Tensor:
        """sigma after one power step from the stored (detached) vectors and weight, differentiable in the
        norm orders only: the paper's objective for learning them (``--learn-p``)."""
        domain, codomain = self.orders()
        weight = self.weight.detach()
        u = normalize_u(self._matvec(weight, self.v.detach()), codomain)
        v = normalize_v(self._rmatvec(weight, u), domain)
        return torch.dot(u, self._matvec(weight, v))

    @torch.no_grad()
    def power_step(self, atol: Optional[float] = None, rtol: Optional[float] = None) -> Optional[Tensor]:
        """One generalised power iteration in place; returns a 0-d bool tensor "converged" if tolerances
        are given. No host synchronisation happens here."""
        domain, codomain = self._detached_orders()
        weight = self.weight.detach()
        u = normalize_u(self._matvec(weight, self.v), codomain)
        v = normalize_v(self._rmatvec(weight, u), domain)
        converged = None
        if atol is not None or rtol is not None:
            atol_ = 0.0 if atol is None else atol
            rtol_ = 0.0 if rtol is None else rtol
            err_u = torch.linalg.vector_norm(u - self.u) / math.sqrt(u.numel())
            err_v = torch.linalg.vector_norm(v - self.v) / math.sqrt(v.numel())
            tol_u = atol_ + rtol_ * u.abs().max()
            tol_v = atol_ + rtol_ * v.abs().max()
            converged = (err_u < tol_u) & (err_v < tol_v)
        self.u.copy_(u)
        self.v.copy_(v)
        return converged


class InducedNormLinear(_LinearMap, InducedNorm):
    """Linear layer normalised by its (p -> q) operator norm, estimated by the power method."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.97,
        domain: Order = 2,
        codomain: Order = 2,
        zero_init: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._build(self._weight_shape(), bias, coeff, domain, codomain, zero_init)

    def _operator_shape(self) -> Tuple[int, int]:
        return self.out_features, self.in_features

    def _matvec(self, weight: Tensor, v: Tensor) -> Tensor:
        return torch.mv(weight, v)

    def _rmatvec(self, weight: Tensor, u: Tensor) -> Tensor:
        return torch.mv(weight.t(), u)

    def extra_repr(self) -> str:
        d, c = self.norm_orders()
        return f"{self.in_features}, {self.out_features}, coeff={self.coeff}, domain={d:.2f}, codomain={c:.2f}"


class InducedNormConv2d(_ConvMap, InducedNorm):
    """Convolution normalised by the (p -> q) norm of the whole convolution operator.

    For k x k kernels ``u`` and ``v`` span the output and input feature maps, so ``spatial_dims`` (the
    input's H, W) is needed at construction; for 1 x 1 kernels they span the C_out x C_in matrix.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        coeff: float = 0.97,
        domain: Order = 2,
        codomain: Order = 2,
        spatial_dims: Optional[Sequence[int]] = None,
        zero_init: bool = False,
    ):
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, spatial_dims)
        self._build(self._weight_shape(), bias, coeff, domain, codomain, zero_init,
                    initialized=torch.tensor(1), spatial_dims=torch.tensor([float(s) for s in self.in_hw]))

    @property
    def is_1x1(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    @property
    def _is_matrix(self) -> bool:
        return self.is_1x1

    def _operator_shape(self) -> Tuple[int, int]:
        if self.is_1x1:
            return self.out_channels, self.in_channels
        return self.out_channels * self.out_hw[0] * self.out_hw[1], self.in_channels * self.in_hw[0] * self.in_hw[1]

    def _matvec(self, weight: Tensor, v: Tensor) -> Tensor:
        if self.is_1x1:
            return torch.mv(weight.view(self.out_channels, self.in_channels), v)
        out = F.conv2d(v.view(1, self.in_channels, *self.in_hw), weight, None, self.stride, self.padding)
        return out.reshape(-1)

    def _rmatvec(self, weight: Tensor, u: Tensor) -> Tensor:
        if self.is_1x1:
            return torch.mv(weight.view(self.out_channels, self.in_channels).t(), u)
        out = F.conv_transpose2d(
            u.view(1, self.out_channels, *self.out_hw), weight, None, self.stride, self.padding, self.output_padding
        )
        return out.reshape(-1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.is_1x1 and tuple(x.shape[-2:]) != self.in_hw:
            raise ValueError(
                f"{type(self).__name__} was built for {self.in_hw[0]}x{self.in_hw[1]} inputs "
                f"(its operator norm covers that feature map) but got {x.shape[-2]}x{x.shape[-1]}"
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        d, c = self.norm_orders()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}, "
            f"coeff={self.coeff}, domain={d:.2f}, codomain={c:.2f}, spatial_dims={self.in_hw}"
        )


class ClosedForm(LipschitzMap):
    """Operator norms with a closed form: ||A||_{1->q} = max_j ||A e_j||_q and
    ||A||_{p->inf} = max_i ||A_i||_{p*}. For a stride-1 convolution these are attained at an interior
    pixel, so they only depend on the kernel: max over input (output) channels of the norm over the rest.

    As in the paper's code (``local_constraint``), each column (domain 1) or row (codomain inf) is rescaled
    on its own to norm at most ``coeff``, which bounds the maximum, i.e. the operator norm, by ``coeff``.
    """

    def _init_estimate(self) -> None:
        self._mode, self._norm_type = closed_form_setting(float(self.domain), float(self.codomain))
        self.refresh_scale()

    def _slice_norms(self) -> Tensor:
        """Norm of every column (input channel) or row (output channel), shaped to broadcast on the weight."""
        w = self.weight
        dim = 1 if self._mode == "col" else 0  # the channel kept; the norm runs over the others
        other = [d for d in range(w.dim()) if d != dim]
        return torch.linalg.vector_norm(w, ord=self._norm_type, dim=other, keepdim=True)

    def sigma(self) -> Tensor:
        return self._slice_norms().max()

    def norm_of(self, weight: Tensor) -> Tensor:
        # The exact closed-form norm of ``weight``: its largest column (row) norm.
        dim = 1 if self._mode == "col" else 0
        other = [d for d in range(weight.dim()) if d != dim]
        return torch.linalg.vector_norm(weight, ord=self._norm_type, dim=other).max()

    def normalized_weight(self) -> Tensor:
        return self.weight / torch.clamp(self._slice_norms() / self.coeff, min=1.0)


class LopLinear(_LinearMap, ClosedForm):
    """Linear layer normalised by a closed-form operator norm (domain 1 or codomain inf)."""

    def __init__(self, in_features, out_features, bias=True, coeff=0.97, domain=1, codomain=INF, zero_init=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._build(self._weight_shape(), bias, coeff, domain, codomain, zero_init)


class LopConv2d(_ConvMap, ClosedForm):
    """Convolution normalised by a closed-form operator norm (domain 1 or codomain inf)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, coeff=0.97,
                 domain=1, codomain=INF, spatial_dims=None, zero_init=False):
        super().__init__()
        if tuple(_pair(stride)) != (1, 1):
            raise ValueError("closed-form convolution norms assume stride 1")
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding,
                           spatial_dims or (max(_pair(kernel_size)),) * 2)
        self._build(self._weight_shape(), bias, coeff, domain, codomain, zero_init)


def get_linear(in_features, out_features, bias=True, coeff=0.97, domain: Order = 2, codomain: Order = 2, **kwargs) -> nn.Module:
    """The normalised linear layer for (domain, codomain): closed form when one exists."""
    cls = LopLinear if has_closed_form(domain, codomain) else InducedNormLinear
    return cls(in_features, out_features, bias, coeff, domain=domain, codomain=codomain, **kwargs)


def get_conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, coeff=0.97,
               domain: Order = 2, codomain: Order = 2, **kwargs) -> nn.Module:
    """The normalised convolution for (domain, codomain): closed form when one exists."""
    cls = LopConv2d if has_closed_form(domain, codomain) else InducedNormConv2d
    return cls(in_channels, out_channels, kernel_size, stride, padding, bias, coeff, domain=domain, codomain=codomain, **kwargs)


def norm_order_gradients(module: nn.Module) -> Optional[Tensor]:
    """Accumulate the learned norm orders' gradients from the paper's objective: the mean over the
    power-method layers with learned orders of their one-step sigma estimate (it pushes the orders towards
    smaller operator norms). Call after clipping the loss gradients (the paper's order: these are not
    clipped). A NaN gradient of an order is dropped. Returns the objective, or None without learned orders."""
    layers = [m for m in module.modules() if isinstance(m, InducedNorm) and m.learnable_orders]
    if not layers:
        return None
    objective = torch.stack([m.one_step_sigma() for m in layers]).mean()
    objective.backward()
    for m in layers:
        if m.domain.grad is not None and torch.isnan(m.domain.grad).any():
            m.domain.grad = None
    return objective.detach()


def lipschitz_layers(module: nn.Module) -> List[LipschitzMap]:
    """Every normalised layer inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, LipschitzMap)]


def power_buffers(module: nn.Module) -> Iterator[Tuple[str, Tensor]]:
    """``(name, buffer)`` of every power-method buffer (:data:`POWER_ITERATION_BUFFERS`) inside ``module``,
    named as in ``module.named_buffers()``."""
    for name, m in module.named_modules():
        if isinstance(m, LipschitzMap):
            for b in POWER_ITERATION_BUFFERS:
                if hasattr(m, b):
                    yield f"{name}.{b}" if name else b, getattr(m, b)
