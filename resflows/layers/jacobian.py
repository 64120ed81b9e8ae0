"""Brute-force Jacobians of small maps: per-example Jacobian matrices and exact log-determinants. Used by
the residual blocks' exact modes (``--exact-trace`` / ``--brute-force``), by :mod:`resflows.exact` and by
the tests as the reference for every estimator. Cost: one backward pass per output dimension."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["batch_jacobian", "per_example_jacobian", "jacobian_logdet", "logabsdet"]


def batch_jacobian(g: Tensor, x: Tensor, create_graph: bool = False) -> Tensor:
    """Per-example Jacobian dg/dx as ``[B, D_out, D_in]`` from an existing graph ``g = f(x)``, one
    vector-Jacobian product per output dimension. Assumes examples do not interact inside ``f``."""
    b = x.shape[0]
    g_flat = g.reshape(b, -1)
    rows = []
    for d in range(g_flat.shape[1]):
        (row,) = torch.autograd.grad(g_flat[:, d].sum(), x, create_graph=create_graph, retain_graph=True)
        rows.append(row.reshape(b, 1, -1))
    return torch.cat(rows, 1)


def logabsdet(m: Tensor) -> Tensor:
    """``log|det m_i|`` of each matrix of a batch ``[B, D, D]`` (differentiable).

    On the CPU one LAPACK call per matrix: with torch 2.14's MKL, the batched LU fails ("Parameter 6 was
    incorrect on entry to DLASWP", then never returns) on matrices of a few hundred rows once
    ``torch.set_num_threads`` has changed in the process, as the tests and benchmarks do."""
    if m.device.type == "cpu":
        return torch.stack([torch.linalg.slogdet(a)[1] for a in m]) if m.shape[0] else m.new_zeros(0)
    return torch.linalg.slogdet(m)[1]


def per_example_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``[B, D_out, D_in]``: the Jacobian of ``fn`` at each example, with ``fn`` called on batches of one
    (so it also holds for maps whose examples would interact in a batch)."""
    d = x[0].numel()
    jacs = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach()
        with torch.enable_grad():
            jac = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(-1), xi, vectorize=False)
        jacs.append(jac.reshape(-1, d))
    return torch.stack(jacs)


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
    jac = per_example_jacobian(fn, x)
    if jac.shape[1] != d:
        raise ValueError(f"fn changes the dimension ({d} -> {jac.shape[1]}); no determinant")
    with torch.no_grad():
        out = torch.cat([fn(x[i : i + 1].detach()) for i in range(x.shape[0])], 0)
    return out, logabsdet(jac)
