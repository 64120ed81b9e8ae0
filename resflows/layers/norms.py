"""Vector-norm arithmetic of the generalised power method: p-norms, their duals, the unit vectors that
maximise an inner product under a p-norm constraint (``normalize_u`` / ``normalize_v``), and the squashing
of a raw learnable order into (1, 5). Pure tensor functions, no modules (Residual Flows, Sec. 3.4;
Higham's generalised power method, QETLAB's InducedMatrixNorm)."""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
Order = Union[float, nn.Parameter]

__all__ = [
    "INF",
    "Order",
    "asym_squash",
    "normalize_u",
    "normalize_v",
    "pnorm",
    "projmax",
    "dual",
    "is_fixed",
    "as_order",
    "has_closed_form",
    "closed_form_setting",
]

INF = float("inf")
_ATANH_HALF = 0.5493061829986572  # atanh(0.5): makes asym_squash(0) == 2.


def _leaky_elu(x: Tensor, a: float = 0.3) -> Tensor:
    return a * x + (1 - a) * F.elu(x)


def asym_squash(x: Tensor) -> Tensor:
    """Map a raw learnable order to (1, 5), with 0 -> 2 (the paper's parametrisation of learned p)."""
    return torch.tanh(-_leaky_elu(-x + _ATANH_HALF)) * 2 + 3


def is_fixed(p, value: float) -> bool:
    """``p`` is the plain number ``value`` (not a learned, tensor-valued order)."""
    return not torch.is_tensor(p) and p == value


def projmax(x: Tensor) -> Tensor:
    """Signed one-hot vector at argmax |x|: the unit l1 vector maximising <x, .>."""
    out = torch.zeros_like(x)
    idx = torch.argmax(x.abs())
    out[idx] = torch.where(x[idx] < 0, -1.0, 1.0).to(x)
    return out


def pnorm(x: Tensor, p) -> Tensor:
    """``||x||_p`` of a vector, p a number (inf allowed) or a 0-d tensor."""
    if is_fixed(p, INF):
        return x.abs().max()
    return x.abs().pow(p).sum().pow(1.0 / p)


def normalize_v(v: Tensor, domain) -> Tensor:
    """Unit p-norm vector (p = domain) maximising <v, .>: the domain-side step of the power method."""
    if is_fixed(domain, 2):
        return F.normalize(v, p=2, dim=0)
    if is_fixed(domain, 1):
        return projmax(v)
    vabs = v.abs()
    sign = torch.sign(v)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    vabs = vabs / vabs.max().clamp_min(torch.finfo(v.dtype).tiny)
    vabs = vabs.pow(1.0 / (domain - 1))
    return sign * vabs / pnorm(vabs, domain)


def normalize_u(u: Tensor, codomain) -> Tensor:
    """Unit dual-norm vector (dual of q = codomain) maximising <u, .>: the codomain-side step."""
    if is_fixed(codomain, 2):
        return F.normalize(u, p=2, dim=0)
    if is_fixed(codomain, INF):
        return projmax(u)
    uabs = u.abs()
    sign = torch.sign(u)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    uabs = uabs / uabs.max().clamp_min(torch.finfo(u.dtype).tiny)
    uabs = uabs.pow(codomain - 1)
    if is_fixed(codomain, 1):
        return sign * uabs / uabs.max()
    return sign * uabs / pnorm(uabs, codomain / (codomain - 1))


def dual(p: float) -> float:
    """The dual exponent p* with 1/p + 1/p* = 1 (1 <-> inf)."""
    if p == 1:
        return INF
    if p == INF:
        return 1.0
    return p / (p - 1)


def as_order(p: Order, name: str) -> Order:
    """A checked norm order: a learnable parameter as is, else a float >= 1 (or inf)."""
    if isinstance(p, nn.Parameter):
        return p
    p = float(p)
    if not p >= 1:
        raise ValueError(f"{name} norm order must be >= 1 or inf, got {p}")
    return p


def has_closed_form(domain: Order, codomain: Order) -> bool:
    """Whether ``||W||_{domain -> codomain}`` has a closed form (fixed domain 1 or codomain inf)."""
    if isinstance(domain, nn.Parameter) or isinstance(codomain, nn.Parameter):
        return False
    return float(domain) == 1 or float(codomain) == INF


def closed_form_setting(domain: float, codomain: float) -> Tuple[str, float]:
    """Which closed form applies: ('col', q) = largest column q-norm (domain 1), or
    ('row', p*) = largest row dual-norm (codomain inf)."""
    if domain == 1:
        return "col", codomain
    if codomain == INF:
        return "row", dual(domain)
    raise ValueError(f"no closed-form operator norm for domain {domain} -> codomain {codomain}")
