"""Exact log-determinants from the full Jacobian, for tests and for checking small models."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from .checks import weight_of

Tensor = torch.Tensor

__all__ = ["exact_logdet", "jacobian_logdet"]


def jacobian_logdet(fn: Callable[[Tensor], Tensor], x: Tensor, max_dim: int = 4096) -> Tuple[Tensor, Tensor]:
    """``(fn(x), log|det d fn / dx|)`` per example, from the full Jacobian of each example.

    ``fn`` must map a batch to a batch of the same total dimension, with examples independent.
    Costs D backward passes and D^2 memory per example, so inputs above ``max_dim`` dimensions are refused.
    """
    d = x[0].numel()
    if d > max_dim:
        raise ValueError(
            f"exact log-det needs the full {d} x {d} Jacobian of each example; that is above max_dim={max_dim}. "
            f"Use the model's stochastic estimate for inputs this large, or raise max_dim if you have the memory"
        )
    outs, logdets = [], []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach()
        with torch.enable_grad():
            jac = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(-1), xi, vectorize=False)
        jac = jac.reshape(-1, d)
        if jac.shape[0] != d:
            raise ValueError(f"fn changes the dimension ({d} -> {jac.shape[0]}); no determinant")
        logdets.append(torch.linalg.slogdet(jac)[1])
        with torch.no_grad():
            outs.append(fn(xi))
    return torch.cat(outs, 0), torch.stack(logdets)


def exact_logdet(model, x: Tensor, max_dim: int = 4096) -> Tuple[Tensor, Tensor]:
    """``(z, log|det dz/dx|)`` of a flow model or layer with a ``transform(x)`` method, computed exactly.
    Run it in float64 (``model.double()``) for a reference value."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch tensor [B, ...], got "
                         f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    p = weight_of(model) if isinstance(model, torch.nn.Module) else None
    if p is not None and (x.dtype != p.dtype or x.device != p.device):
        raise ValueError(f"x is {x.dtype} on {x.device}, but the model's parameters are {p.dtype} on {p.device}; "
                         f"convert one to match (for a reference value, model.double() and x.double())")
    fn = model.transform if hasattr(model, "transform") else (lambda t: model(t)[0])
    return jacobian_logdet(fn, x, max_dim)
