"""Exact log-determinants from the full Jacobian, for tests and for checking small models (the Jacobian
arithmetic itself lives in :mod:`resflows.layers.jacobian`, shared with the residual blocks' exact modes)."""
from __future__ import annotations

from typing import Tuple

import torch

from .checks import weight_of
from .layers.jacobian import jacobian_logdet

Tensor = torch.Tensor

__all__ = ["exact_logdet", "jacobian_logdet"]


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
