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
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init

Tensor = torch.Tensor
Order = Union[float, nn.Parameter]

__all__ = [
    "InducedNormLinear",
    "InducedNormConv2d",
    "LopLinear",
    "LopConv2d",
    "get_linear",
    "get_conv2d",
    "asym_squash",
    "update_lipschitz",
    "lipschitz_layers",
    "norm_order_gradients",
    "normalize_u",
    "normalize_v",
]

INF = float("inf")
_ATANH_HALF = 0.5493061829986572  # atanh(0.5): makes asym_squash(0) == 2.


def _leaky_elu(x: Tensor, a: float = 0.3) -> Tensor:
    return a * x + (1 - a) * F.elu(x)


def asym_squash(x: Tensor) -> Tensor:
    """Map a raw learnable order to (1, 5), with 0 -> 2 (the paper's parametrisation of learned p)."""
    return torch.tanh(-_leaky_elu(-x + _ATANH_HALF)) * 2 + 3


def _is_fixed(p, value: float) -> bool:
    return not torch.is_tensor(p) and p == value


def _projmax(x: Tensor) -> Tensor:
    """Signed one-hot vector at argmax |x|: the unit l1 vector maximising <x, .>."""
    out = torch.zeros_like(x)
    idx = torch.argmax(x.abs())
    out[idx] = torch.where(x[idx] < 0, -1.0, 1.0).to(x)
    return out


def _pnorm(x: Tensor, p) -> Tensor:
    if _is_fixed(p, INF):
        return x.abs().max()
    return x.abs().pow(p).sum().pow(1.0 / p)


def normalize_v(v: Tensor, domain) -> Tensor:
    """Unit p-norm vector (p = domain) maximising <v, .>: the domain-side step of the power method."""
    if _is_fixed(domain, 2):
        return F.normalize(v, p=2, dim=0)
    if _is_fixed(domain, 1):
        return _projmax(v)
    vabs = v.abs()
    sign = torch.sign(v)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    vabs = vabs / vabs.max().clamp_min(torch.finfo(v.dtype).tiny)
    vabs = vabs.pow(1.0 / (domain - 1))
    return sign * vabs / _pnorm(vabs, domain)


def normalize_u(u: Tensor, codomain) -> Tensor:
    """Unit dual-norm vector (dual of q = codomain) maximising <u, .>: the codomain-side step."""
    if _is_fixed(codomain, 2):
        return F.normalize(u, p=2, dim=0)
    if _is_fixed(codomain, INF):
        return _projmax(u)
    uabs = u.abs()
    sign = torch.sign(u)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    uabs = uabs / uabs.max().clamp_min(torch.finfo(u.dtype).tiny)
    uabs = uabs.pow(codomain - 1)
    if _is_fixed(codomain, 1):
        return sign * uabs / uabs.max()
    return sign * uabs / _pnorm(uabs, codomain / (codomain - 1))


def _dual(p: float) -> float:
    if p == 1:
        return INF
    if p == INF:
        return 1.0
    return p / (p - 1)


def _as_order(p: Order, name: str) -> Order:
    if isinstance(p, nn.Parameter):
        return p
    p = float(p)
    if not p >= 1:
        raise ValueError(f"{name} norm order must be >= 1 or inf, got {p}")
    return p


class _LipschitzMap(nn.Module):
    """Shared logic of the normalised layers: orders, sigma, normalised weight, Lipschitz update."""

    coeff: float
    weight: Tensor

    # -- norm orders -------------------------------------------------------------------------
    def _set_orders(self, domain: Order, codomain: Order) -> None:
        # Assigned before the weight so learnable orders come first in state_dict (paper key order).
        self.domain = _as_order(domain, "domain")
        self.codomain = _as_order(codomain, "codomain")

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
    def _matvec(self, weight: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _rmatvec(self, weight: Tensor, u: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sigma(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def normalized_weight(self) -> Tensor:
        """W / max(1, sigma / coeff); differentiable through sigma."""
        return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)

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
    def update_lipschitz(self, n_iterations=None, atol=None, rtol=None, max_iterations=200) -> int:
        """Run the power method on this layer alone; returns the iterations used."""
        return update_lipschitz([self], n_iterations, atol, rtol, max_iterations)


class _InducedNorm(_LipschitzMap):
    """Generalised power method on buffers ``u`` (codomain side) and ``v`` (domain side)."""

    n_iterations: Optional[int]
    atol: Optional[float]
    rtol: Optional[float]

    def _init_power_vectors(self, n_out: int, n_in: int) -> None:
        domain, codomain = self.orders()
        with torch.no_grad():
            u = normalize_u(self.weight.new_empty(n_out).normal_(0, 1), codomain.detach() if torch.is_tensor(codomain) else codomain)
            v = normalize_v(self.weight.new_empty(n_in).normal_(0, 1), domain.detach() if torch.is_tensor(domain) else domain)
        self.register_buffer("u", u)
        self.register_buffer("v", v)
        self._converge_from_restarts()

    @torch.no_grad()
    def _converge_from_restarts(self, restarts: int = 10) -> None:
        # The p != 2 power method can stop at a local maximum: keep the best of a few random starts.
        if self.weight.is_meta:  # built on the meta device to check shapes only: there is nothing to iterate on
            return
        update_lipschitz([self], None, 1e-4, 1e-4, max_iterations=200)
        d, c = self.norm_orders()
        if d == 2 and c == 2:
            return
        best = (float(self.scale), self.u.clone(), self.v.clone())
        domain, codomain = self._detached_orders()
        for _ in range(restarts):
            self.u.copy_(normalize_u(torch.randn_like(self.u), codomain))
            self.v.copy_(normalize_v(torch.randn_like(self.v), domain))
            update_lipschitz([self], None, 1e-4, 1e-4, max_iterations=200)
            if float(self.scale) > best[0]:
                best = (float(self.scale), self.u.clone(), self.v.clone())
        self.u.copy_(best[1])
        self.v.copy_(best[2])
        self.refresh_scale()

    def sigma(self) -> Tensor:
        # The stored vectors, also with learned orders (as the paper): the orders get their gradient from
        # one_step_sigma, a separate objective, not from the loss.
        return torch.dot(self.u, self._matvec(self.weight, self.v))

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


def _reset_like_torch(weight: Tensor, bias: Optional[Tensor]) -> None:
    # PyTorch's default initialisation of nn.Linear / nn.Conv2d.
    init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(bias, -bound, bound)


class InducedNormLinear(_InducedNorm):
    """Linear layer normalised by its (p -> q) operator norm, estimated by the power method."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.97,
        domain: Order = 2,
        codomain: Order = 2,
        n_iterations: Optional[int] = None,
        atol: Optional[float] = None,
        rtol: Optional[float] = None,
        zero_init: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.coeff, self.n_iterations, self.atol, self.rtol = coeff, n_iterations, atol, rtol
        self._set_orders(domain, codomain)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _reset_like_torch(self.weight, self.bias)
        if zero_init:
            with torch.no_grad():
                self.weight.div_(1000)  # near-identity residual branch; exact zeros break the power method
        self.register_buffer("scale", torch.tensor(0.0))
        self._init_power_vectors(out_features, in_features)

    def _matvec(self, weight: Tensor, v: Tensor) -> Tensor:
        return torch.mv(weight, v)

    def _rmatvec(self, weight: Tensor, u: Tensor) -> Tensor:
        return torch.mv(weight.t(), u)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        d, c = self.norm_orders()
        return f"{self.in_features}, {self.out_features}, coeff={self.coeff}, domain={d:.2f}, codomain={c:.2f}"


def _pair(x) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)  # type: ignore[return-value]


class _ConvGeometry:
    """Output size and transpose padding of a 2-D convolution over a fixed feature map."""

    def _set_geometry(self, kernel_size, stride, padding, spatial_dims) -> None:
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


class InducedNormConv2d(_InducedNorm, _ConvGeometry):
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
        n_iterations: Optional[int] = None,
        atol: Optional[float] = None,
        rtol: Optional[float] = None,
        spatial_dims: Optional[Sequence[int]] = None,
        zero_init: bool = False,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self._set_geometry(kernel_size, stride, padding, spatial_dims)
        self.coeff, self.n_iterations, self.atol, self.rtol = coeff, n_iterations, atol, rtol
        self._set_orders(domain, codomain)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _reset_like_torch(self.weight, self.bias)
        if zero_init:
            with torch.no_grad():
                self.weight.div_(1000)
        self.register_buffer("initialized", torch.tensor(1))
        self.register_buffer("spatial_dims", torch.tensor([float(s) for s in self.in_hw]))
        self.register_buffer("scale", torch.tensor(0.0))
        if self.is_1x1:
            n_out, n_in = out_channels, in_channels
        else:
            n_out = out_channels * self.out_hw[0] * self.out_hw[1]
            n_in = in_channels * self.in_hw[0] * self.in_hw[1]
        self._init_power_vectors(n_out, n_in)

    @property
    def is_1x1(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

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
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        d, c = self.norm_orders()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}, "
            f"coeff={self.coeff}, domain={d:.2f}, codomain={c:.2f}, spatial_dims={self.in_hw}"
        )


def _closed_form_setting(domain: float, codomain: float) -> Tuple[str, float]:
    """Which closed form applies: ('col', q) = largest column q-norm (domain 1), or
    ('row', p*) = largest row dual-norm (codomain inf)."""
    if domain == 1:
        return "col", codomain
    if codomain == INF:
        return "row", _dual(domain)
    raise ValueError(f"no closed-form operator norm for domain {domain} -> codomain {codomain}")


class _ClosedForm(_LipschitzMap):
    """Operator norms with a closed form: ||A||_{1->q} = max_j ||A e_j||_q and
    ||A||_{p->inf} = max_i ||A_i||_{p*}. For a stride-1 convolution these are attained at an interior
    pixel, so they only depend on the kernel: max over input (output) channels of the norm over the rest.

    As in the paper's code (``local_constraint``), each column (domain 1) or row (codomain inf) is rescaled
    on its own to norm at most ``coeff``, which bounds the maximum, i.e. the operator norm, by ``coeff``.
    """

    def _setup_closed_form(self, domain: float, codomain: float) -> None:
        self._set_orders(domain, codomain)
        self._mode, self._norm_type = _closed_form_setting(float(domain), float(codomain))

    def _slice_norms(self) -> Tensor:
        """Norm of every column (input channel) or row (output channel), shaped to broadcast on the weight."""
        w = self.weight
        dim = 1 if self._mode == "col" else 0  # the channel kept; the norm runs over the others
        other = [d for d in range(w.dim()) if d != dim]
        return torch.linalg.vector_norm(w, ord=self._norm_type, dim=other, keepdim=True)

    def sigma(self) -> Tensor:
        return self._slice_norms().max()

    def normalized_weight(self) -> Tensor:
        return self.weight / torch.clamp(self._slice_norms() / self.coeff, min=1.0)


class LopLinear(_ClosedForm):
    """Linear layer normalised by a closed-form operator norm (domain 1 or codomain inf)."""

    def __init__(self, in_features, out_features, bias=True, coeff=0.97, domain=1, codomain=INF, zero_init=False, **unused):
        super().__init__()
        self.in_features, self.out_features, self.coeff = in_features, out_features, coeff
        self._setup_closed_form(domain, codomain)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _reset_like_torch(self.weight, self.bias)
        if zero_init:
            with torch.no_grad():
                self.weight.div_(1000)
        self.register_buffer("scale", torch.tensor(0.0))
        self.refresh_scale()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class LopConv2d(_ClosedForm, _ConvGeometry):
    """Convolution normalised by a closed-form operator norm (domain 1 or codomain inf)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, coeff=0.97,
                 domain=1, codomain=INF, spatial_dims=None, zero_init=False, **unused):
        super().__init__()
        self.in_channels, self.out_channels, self.coeff = in_channels, out_channels, coeff
        if tuple(_pair(stride)) != (1, 1):
            raise ValueError("closed-form convolution norms assume stride 1")
        self._set_geometry(kernel_size, stride, padding, spatial_dims or (max(_pair(kernel_size)),) * 2)
        self._setup_closed_form(domain, codomain)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _reset_like_torch(self.weight, self.bias)
        if zero_init:
            with torch.no_grad():
                self.weight.div_(1000)
        self.register_buffer("scale", torch.tensor(0.0))
        self.refresh_scale()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding)


def _use_closed_form(domain: Order, codomain: Order) -> bool:
    if isinstance(domain, nn.Parameter) or isinstance(codomain, nn.Parameter):
        return False
    return float(domain) == 1 or float(codomain) == INF


def get_linear(in_features, out_features, bias=True, coeff=0.97, domain: Order = 2, codomain: Order = 2, **kwargs) -> nn.Module:
    """The normalised linear layer for (domain, codomain): closed form when one exists."""
    cls = LopLinear if _use_closed_form(domain, codomain) else InducedNormLinear
    return cls(in_features, out_features, bias, coeff, domain=domain, codomain=codomain, **kwargs)


def get_conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, coeff=0.97,
               domain: Order = 2, codomain: Order = 2, **kwargs) -> nn.Module:
    """The normalised convolution for (domain, codomain): closed form when one exists."""
    cls = LopConv2d if _use_closed_form(domain, codomain) else InducedNormConv2d
    return cls(in_channels, out_channels, kernel_size, stride, padding, bias, coeff, domain=domain, codomain=codomain, **kwargs)


def norm_order_gradients(module: nn.Module) -> Optional[Tensor]:
    """Accumulate the learned norm orders' gradients from the paper's objective: the mean over the
    power-method layers with learned orders of their one-step sigma estimate (it pushes the orders towards
    smaller operator norms). Call after clipping the loss gradients (the paper's order: these are not
    clipped). A NaN gradient of an order is dropped. Returns the objective, or None without learned orders."""
    layers = [m for m in module.modules() if isinstance(m, _InducedNorm) and m.learnable_orders]
    if not layers:
        return None
    objective = torch.stack([m.one_step_sigma() for m in layers]).mean()
    objective.backward()
    for m in layers:
        if m.domain.grad is not None and torch.isnan(m.domain.grad).any():
            m.domain.grad = None
    return objective.detach()


def lipschitz_layers(module: nn.Module) -> List[_LipschitzMap]:
    """Every normalised layer inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, _LipschitzMap)]


@torch.no_grad()
def update_lipschitz(
    layers: Iterable[_LipschitzMap],
    n_iterations: Optional[int] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    max_iterations: int = 200,
    check_every: Optional[int] = None,
) -> int:
    """Power iterations on many layers in lock-step, then refresh each layer's ``scale``.

    With ``n_iterations`` set, exactly that many steps run. Otherwise steps run until every layer's
    ``u`` and ``v`` change by less than ``atol + rtol * max|.|`` (RMS change), at most
    ``max_iterations``. Convergence flags of all layers are gathered in one host transfer, taken every
    iteration on CPU and every ``check_every`` (default 2) iterations on accelerators, so there is no
    per-layer, per-iteration synchronisation. Returns the number of iterations run.
    """
    layers = list(layers)
    iterative = [m for m in layers if isinstance(m, _InducedNorm)]
    if n_iterations is None and atol is None and rtol is None:
        raise ValueError("update_lipschitz needs n_iterations or a tolerance (atol/rtol)")
    used = 0
    if n_iterations is not None:
        rest = _batched_power_steps(iterative, n_iterations)
        for _ in range(n_iterations):
            for m in rest:
                m.power_step()
        used = n_iterations
    elif iterative:
        on_cpu = iterative[0].weight.device.type == "cpu"
        every = 1 if on_cpu else (check_every or 2)
        active = iterative
        for it in range(max_iterations):
            flags = [m.power_step(atol, rtol) for m in active]
            used = it + 1
            if (it + 1) % every == 0 or it + 1 == max_iterations:
                done = torch.stack(flags).cpu().tolist()
                active = [m for m, d in zip(active, done) if not d]
                if not active:
                    break
    _refresh_scales(layers)
    return used


def _batchable(m: _LipschitzMap) -> bool:
    # 2 -> 2 power method on a plain matrix (linear layers, 1x1 convolutions): one bmm for a whole group.
    if not isinstance(m, _InducedNorm) or m.learnable_orders or (m.domain, m.codomain) != (2.0, 2.0):
        return False
    return isinstance(m, InducedNormLinear) or (isinstance(m, InducedNormConv2d) and m.is_1x1)


def _groups(layers: Sequence[_LipschitzMap]):
    """Batchable layers grouped by weight shape, dtype and device (groups of one are left alone)."""
    groups: dict = {}
    for m in layers:
        if _batchable(m):
            groups.setdefault((tuple(m.weight.shape), m.weight.dtype, m.weight.device), []).append(m)
    return [g for g in groups.values() if len(g) > 1]


@torch.no_grad()
def _batched_power_steps(layers: Sequence[_InducedNorm], n: int) -> List[_InducedNorm]:
    """``n`` plain 2-norm power steps on every group of same-shaped layers at once (the toy model has 500
    such layers: one small kernel per layer and step cost more than the arithmetic). Same steps as
    ``power_step``; returns the layers left for it."""
    groups = _groups(layers)
    done = {id(m) for g in groups for m in g}
    for g in groups:
        w = torch.stack([m.weight.detach().reshape(m.weight.shape[0], -1) for m in g])
        u, v = torch.stack([m.u for m in g]), torch.stack([m.v for m in g])
        for _ in range(n):
            u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), p=2, dim=1)
            v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), p=2, dim=1)
        torch._foreach_copy_([m.u for m in g], list(u.unbind(0)))
        torch._foreach_copy_([m.v for m in g], list(v.unbind(0)))
    return [m for m in layers if id(m) not in done]


@torch.no_grad()
def _refresh_scales(layers: Sequence[_LipschitzMap]) -> None:
    """``refresh_scale`` of every layer, batched over groups of same-shaped 2-norm layers."""
    groups = _groups(layers)
    done = {id(m) for g in groups for m in g}
    for g in groups:
        w = torch.stack([m.weight.detach().reshape(m.weight.shape[0], -1) for m in g])
        u, v = torch.stack([m.u for m in g]), torch.stack([m.v for m in g])
        sigma = (u * torch.bmm(w, v.unsqueeze(2)).squeeze(2)).sum(1)
        torch._foreach_copy_([m.scale for m in g], list(sigma.unbind(0)))
    for m in layers:
        if id(m) not in done:
            m.refresh_scale()
