"""Anderson acceleration of the fixed-point inverse of a residual block (``--inverse anderson``).

The inverse of ``y = x + g(x)`` is the fixed point of ``G(x) = y - g(x)``; the paper iterates ``x <- G(x)``
(Behrmann et al. 2019, Alg. 1), which converges linearly at rate ``Lip(g)``. Anderson acceleration (type II,
Walker & Ni 2011) instead takes the combination of the last ``m`` values ``G(x_i)`` whose residuals
``G(x_i) - x_i`` combine to the smallest norm, per sample. Each iteration still costs one evaluation of ``g``.

Stopping rule: the plain iteration's, applied to the residual: stop when every element has
``(G(x_k) - x_k)^2 < atol + rtol |y|`` and return ``G(x_k)`` (in the plain iteration ``G(x_k) - x_k`` is
exactly the step ``x_{k+1} - x_k`` it tests, and ``G(x_k)`` what it returns).
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["anderson_fixed_point", "anderson_weights"]


@torch.no_grad()
def anderson_fixed_point(G: Callable[[Tensor], Tensor], y: Tensor, tol: Tensor, max_evals: int, m: int = 5,
                         lam: float = 1e-4) -> Tuple[Tensor, int, bool]:
    """Solve ``x = G(x)`` from ``x0 = G(y)``. Returns ``(x, evaluations of G, converged)``.

    ``tol``: per-element tolerance (the stopping rule above); ``m``: history length; ``lam``: Tikhonov
    regularisation of the small least-squares problems (relative to their scale)."""
    b = y.shape[0]
    shape = y.shape
    flat = lambda t: t.reshape(b, -1)  # noqa: E731
    tol = flat(tol.expand(shape))
    X = y.new_zeros(b, m, flat(y).shape[1])  # iterates x_i
    F = torch.zeros_like(X)  # G(x_i)
    X[:, 0] = flat(y)
    F[:, 0] = flat(G(y))
    evals = 1
    if bool((((F[:, 0] - X[:, 0]) ** 2) / tol < 1).all()):
        return F[:, 0].reshape(shape), evals, True
    X[:, 1] = F[:, 0]
    F[:, 1] = flat(G(F[:, 0].reshape(shape)))
    evals += 1
    k = 1
    while True:
        cur = k % m
        res = F[:, cur] - X[:, cur]
        if bool(((res**2) / tol < 1).all()):
            return F[:, cur].reshape(shape), evals, True
        if evals >= max_evals:
            return F[:, cur].reshape(shape), evals, False
        n = min(k + 1, m)
        alpha = anderson_weights(F[:, :n] - X[:, :n], lam)  # [b, n]
        k += 1
        nxt = k % m
        X[:, nxt] = torch.bmm(alpha.unsqueeze(1), F[:, :n]).squeeze(1)
        F[:, nxt] = flat(G(X[:, nxt].reshape(shape)))
        evals += 1


def anderson_weights(R: Tensor, lam: float) -> Tensor:
    """The mixing weights [b, n] of Anderson acceleration from the residuals ``R`` [b, n, d] of the last n iterates:
    min_alpha ||sum_i alpha_i R_i|| subject to sum_i alpha_i = 1, per sample, via its KKT system, with a Tikhonov
    term ``lam`` times the mean squared residual norm."""
    b, n = R.shape[:2]
    H = torch.bmm(R, R.transpose(1, 2))
    scale = H.diagonal(dim1=1, dim2=2).mean(1).clamp_min(torch.finfo(H.dtype).tiny)
    H = H + lam * scale[:, None, None] * torch.eye(n, dtype=H.dtype, device=H.device)
    A = H.new_zeros(b, n + 1, n + 1)
    A[:, 0, 1:] = 1
    A[:, 1:, 0] = 1
    A[:, 1:, 1:] = H
    rhs = H.new_zeros(b, n + 1, 1)
    rhs[:, 0] = 1
    return torch.linalg.solve(A, rhs)[:, 1:, 0]
