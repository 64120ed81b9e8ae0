"""The monotone (Cayley) block of Monotone Flows (Ahn, Kim, Hong, Kim, "Invertible Monotone Operators for
Normalizing Flows", NeurIPS 2022).

With a branch ``g`` of Lipschitz constant ``L < 1`` (the residual or dense branch of :class:`iResBlock`), the block

    forward:  solve  w + g(w) = sqrt(2) x,   return  y = sqrt(2) w - x
    inverse:  solve  w - g(w) = sqrt(2) y,   return  x = sqrt(2) w - y

is the Cayley operator of ``v -> g(sqrt(2) v) / sqrt(2)``: in the parameters ``x = (w + g(w)) / sqrt(2)`` and
``y = (w - g(w)) / sqrt(2)`` its graph is the graph of ``g`` rotated by 45 degrees, so
``<F(a) - F(b), a - b> = (|dw|^2 - |dg|^2) / 2 >= (1 - L^2) |dw|^2 / 2`` (strongly monotone) and
``dy/dx = (I - J)(I + J)^{-1}``, ``J = dg/dw`` at the solution ``w``. Hence

    log|det dy/dx| = log det(I - J) - log det(I + J) = sum over odd k of -2/k tr(J^k)     (= -2 tr artanh J),

estimated like the residual block's series: a Hutchinson probe and the same Russian roulette (unbiased), 20 exact
terms in evaluation, exact ``slogdet`` with ``brute_force`` (and for 2-D inputs in evaluation).

Both solves are contractions with rate ``L`` (``w = sqrt(2) x - g(w)``, ``w = sqrt(2) y + g(w)``), iterated by
:func:`solve_fixed_point` (the plain iteration or Anderson acceleration) with a per-sample stopping rule.

Gradients by implicit differentiation: for a loss ``l(w)``, ``dl/d(sqrt(2) x) = u`` and ``dl/dtheta = -u^T dg/dtheta``
with ``u = (I + J^T)^{-1} dl/dw``, the adjoint, solved by the same iteration ``u = dl/dw - J^T u`` (never by
unrolling the forward solve). The log-det's own gradient is ``d log det = -2 tr((I - J^2)^{-1} dJ)``
(``d tr J^k = k tr(J^{k-1} dJ)``): with ``s = -2 sum over odd k of w_k (J^T)^{k-1} v`` computed without a graph (the
same roulette weights, so ``E s = -2 (I - J^2)^{-T} v``), ``d(s^T J v)`` is an unbiased estimate of it through one
differentiated product (the Neumann route), formed in this block's backward pass with ``--mem-eff``, each sample
weighted by its own upstream gradient. ``--neumann-grad False`` differentiates the series itself.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import linearize
from .anderson import anderson_weights
from .iresblock import InverseNotConvergedWarning, _basic_series_with_graph, _bcast, _dot, iResBlock
from .jacobian import batch_jacobian, logabsdet

Tensor = torch.Tensor

__all__ = ["MonotoneBlock", "solve_fixed_point", "monotone_series", "MONOTONE_SOLVE_TOL", "MONOTONE_SOLVE_MAX_ITERS",
           "ADJOINT_RTOL", "ADJOINT_ATOL", "ADJOINT_MAX_ITERS", "STALL_ITERS", "SolveNotConvergedWarning"]

SQRT2 = math.sqrt(2.0)
# Forward and inverse solves: stop a sample when max|w_k+1 - w_k| <= atol + rtol max|w_k+1| (float32-safe values;
# the forks used 1e-6 relative to the initial guess, which float32 residuals cannot always reach).
MONOTONE_SOLVE_TOL = 1e-5
MONOTONE_SOLVE_MAX_ITERS = 2000
# Adjoint solve u = grad - J^T u: relative per sample, so its accuracy does not depend on the loss scaling.
ADJOINT_RTOL = 1e-5
ADJOINT_ATOL = 0.0
ADJOINT_MAX_ITERS = 200
# A sample whose residual has not improved for this many iterations is at float round-off: stop it.
STALL_ITERS = 10
ANDERSON_MEMORY = 5


class SolveNotConvergedWarning(InverseNotConvergedWarning):
    """A solve of a monotone block (forward, inverse or adjoint) stopped before its tolerance."""


# ------------------------------------------------------------------------------------------------
# Fixed-point solver with a per-sample stopping rule
# ------------------------------------------------------------------------------------------------
def _per_sample_max(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).abs().amax(1)


@torch.no_grad()
def solve_fixed_point(G: Callable[[Tensor], Tensor], x0: Tensor, atol: float, rtol: float, max_iters: int,
                      method: str = "fixed-point", stall: int = STALL_ITERS, memory: int = ANDERSON_MEMORY
                      ) -> Tuple[Tensor, int, Tensor]:
    """Solve ``x = G(x)`` from ``x0``. Returns ``(x, evaluations of G, converged[B])``.

    Per sample: stop when ``max|G(x_k) - x_k| <= atol + rtol max|G(x_k)|`` (and keep ``G(x_k)``), or when the ratio
    of the two has not improved for ``stall`` iterations (round-off); stopped samples are held fixed while the
    others go on. ``method``: ``'fixed-point'`` (``x <- G(x)``) or ``'anderson'`` (type-II Anderson acceleration over
    the last ``memory`` iterates, as ``--inverse anderson``). ``G`` must act on each sample independently.
    """
    if method not in ("fixed-point", "anderson"):
        raise ValueError(f"method must be 'fixed-point' or 'anderson', got {method!r}")
    b = x0.shape[0]
    shape = x0.shape
    x = x0
    out = x0.clone()
    done = torch.zeros(b, dtype=torch.bool, device=x0.device)
    converged = torch.zeros_like(done)
    best = torch.full((b,), float("inf"), dtype=x0.dtype, device=x0.device)
    since_best = torch.zeros(b, dtype=torch.int64, device=x0.device)
    hist_x: List[Tensor] = []
    hist_g: List[Tensor] = []
    evals = 0
    while True:
        gx = G(x)
        evals += 1
        res = gx - x
        ratio = _per_sample_max(res) / (atol + rtol * _per_sample_max(gx)).clamp_min(torch.finfo(x0.dtype).tiny)
        ok = ratio <= 1.0
        improved = ratio < best
        best = torch.where(improved, ratio, best)
        since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
        stop = ~done & (ok | (since_best >= stall) | (evals >= max_iters))
        out = torch.where(_bcast(stop, out), gx, out)
        converged = converged | (stop & ok)
        done = done | stop
        if bool(done.all()):
            return out, evals, converged
        if method == "fixed-point":
            x = gx
            continue
        hist_x.append(x.reshape(b, -1))
        hist_g.append(gx.reshape(b, -1))
        if len(hist_x) > memory:
            hist_x.pop(0)
            hist_g.pop(0)
        if len(hist_x) == 1:
            x = gx
            continue
        X, Gs = torch.stack(hist_x, 1), torch.stack(hist_g, 1)  # [b, n, d]
        alpha = anderson_weights(Gs - X, 1e-4)[..., None]  # [b, n, 1]
        x = (alpha * Gs).sum(1).reshape(shape)


# ------------------------------------------------------------------------------------------------
# The series: sum over odd k of -2/k w_k v^T J^k v, and the vector of its exact derivative
# ------------------------------------------------------------------------------------------------
def _last_odd(n: int) -> int:
    return n if n % 2 else n - 1


def monotone_series(vjp: Callable[[Tensor], Tensor], v: Tensor, weights: Sequence[float], neumann: bool
                    ) -> Tuple[Tensor, Optional[Tensor]]:
    """Without a graph: ``estimate = sum_{k odd} -2/k w_k v^T J^k v`` and, for the Neumann gradient,
    ``s = -2 sum_{k odd} w_k (v^T J^{k-1})``: ``s^T dJ v`` estimates ``d log det`` without bias (``E s = -2 (I - J^2)^{-T} v``)."""
    n_terms = _last_odd(len(weights))
    estimate = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    s = v * (-2.0 * weights[0]) if (neumann and n_terms >= 1) else None
    t = v
    for k in range(1, n_terms + 1):
        t = vjp(t)  # v^T J^k
        if k % 2:
            estimate = estimate + (-2.0 * weights[k - 1] / k) * _dot(t, v)
        elif neumann:
            s.add_(t, alpha=-2.0 * weights[k])  # k even: the term k + 1's derivative
    return estimate, s


def residual_weights(weights: Sequence[float]) -> List[float]:
    """The monotone coefficients as weights of the residual series ``sum (-1)^{k+1} w'_k / k``: ``w'_k = -2 w_k`` for
    odd k and 0 for even k (used to differentiate the whole series with a graph)."""
    n = _last_odd(len(weights))
    return [(-2.0 * w if k % 2 else 0.0) for k, w in enumerate(weights[:n], start=1)]


@contextlib.contextmanager
def _branch_condition(nnet: nn.Module, condition: Optional[Tensor]):
    """A conditioned branch (the variational dequantiser's ``g(s; x)``, which reads ``x`` from its ``condition``
    attribute, set only during the forward pass) sees the forward pass's condition again in the backward pass."""
    if condition is None:
        yield
        return
    old, nnet.condition = nnet.condition, condition
    try:
        yield
    finally:
        nnet.condition = old


class _ImplicitSolve(torch.autograd.Function):
    """``b -> w`` with ``w + g(w) = b``; backward: ``u = (I + J^T)^{-1} grad_w`` by the fixed-point iteration
    ``u = grad_w - J^T u``, then ``grad_b = u`` and ``grad_theta = -u^T dg/dtheta`` at ``w``."""

    @staticmethod
    def forward(ctx, block: "MonotoneBlock", b: Tensor, *params: Tensor):
        w = block._solve(b, sign=-1.0)
        ctx.block = block
        ctx.condition = getattr(block.nnet, "condition", None)  # a dequantiser branch's image (None otherwise)
        ctx.save_for_backward(w)
        return w

    @staticmethod
    def backward(ctx, grad_w: Tensor):
        (w,) = ctx.saved_tensors
        block = ctx.block
        params = [p for p in block.nnet.parameters() if p.requires_grad]
        with torch.enable_grad(), _branch_condition(block.nnet, ctx.condition):
            w_ = w.detach().requires_grad_(True)
            g = block.nnet(w_)
        if block.linearizable:
            with _branch_condition(block.nnet, ctx.condition):
                _, tape = linearize.primal(block.nnet, w)
            vjp = lambda u: linearize.tape_vjp(tape, u)  # noqa: E731
        else:
            vjp = lambda u: torch.autograd.grad(g, w_, u, retain_graph=True)[0]  # noqa: E731
        with torch.no_grad():
            u, block.last_adjoint_iters, ok = solve_fixed_point(
                lambda u: grad_w - vjp(u), grad_w, block.adjoint_atol, block.adjoint_rtol, block.adjoint_max_iters,
                block.inverse_method)
        block._warn_unconverged(ok, "adjoint")
        grads = torch.autograd.grad(g, params, -u, allow_unused=True) if params else ()
        grads = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, grads)]
        return (None, u, *grads)


class _LinearizedMonotoneLogDet(torch.autograd.Function):
    """The default training path (Neumann gradient, ``--mem-eff``) on the hand-written linearisation: the series
    from tape products without a graph; backward: one differentiable forward-mode pass gives ``J v`` and a single
    first-order backward of ``sum_i c_i s_i^T J_i v_i`` (``c_i``: each sample's upstream gradient)."""

    @staticmethod
    def forward(ctx, block: "MonotoneBlock", w: Tensor, v: Tensor, weights: List[float], *params: Tensor):
        _, tape = linearize.primal(block.nnet, w)
        estimate, s = monotone_series(lambda t: linearize.tape_vjp(tape, t), v, weights, neumann=True)
        ctx.block, ctx.tape = block, linearize.strip_tape(tape)
        ctx.save_for_backward(w, v, s)
        return estimate

    @staticmethod
    def backward(ctx, grad_logdet: Tensor):
        w, v, s = ctx.saved_tensors
        params = [p for p in ctx.block.nnet.parameters() if p.requires_grad]
        with torch.enable_grad():
            w_ = w.detach().requires_grad_(True)
            _, jv = linearize.dual(ctx.block.nnet, w_, v, ctx.tape)
            grads = torch.autograd.grad((s * _bcast(grad_logdet, s) * jv).sum(), [w_] + params, allow_unused=True)
        ctx.tape = None
        grad_params = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, grads[1:])]
        return (None, grads[0], None, None, *grad_params)


class _DeferredMonotoneLogDet(torch.autograd.Function):
    """``--mem-eff`` through autograd (branches without a linearisation, or ``--neumann-grad False``): the series runs
    without a graph in the forward pass; the differentiated part is formed in this block's backward pass."""

    @staticmethod
    def forward(ctx, block: "MonotoneBlock", w: Tensor, v: Tensor, weights: List[float], *params: Tensor):
        with torch.enable_grad():
            w_ = w.detach().requires_grad_(True)
            g = block.nnet(w_)
        vjp = lambda t: torch.autograd.grad(g, w_, t, retain_graph=True)[0]  # noqa: E731
        with torch.no_grad():
            estimate, s = monotone_series(vjp, v, weights, neumann=block.neumann_grad)
        ctx.block, ctx.g, ctx.w, ctx.v, ctx.s, ctx.weights = block, g, w_, v, s, weights
        return estimate

    @staticmethod
    def backward(ctx, grad_logdet: Tensor):
        block, g, w_, v, s = ctx.block, ctx.g, ctx.w, ctx.v, ctx.s
        params = [p for p in block.nnet.parameters() if p.requires_grad]
        with torch.enable_grad():
            if block.neumann_grad:
                (sj,) = torch.autograd.grad(g, w_, s * _bcast(grad_logdet, s), create_graph=True, retain_graph=True)
                total = (sj * v).sum()
            else:
                total = (_basic_series_with_graph(g, w_, v, residual_weights(ctx.weights)) * grad_logdet).sum()
            grads = torch.autograd.grad(total, [w_] + params, allow_unused=True)
        ctx.g = ctx.w = ctx.v = ctx.s = None
        grad_params = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, grads[1:])]
        return (None, grads[0], None, None, *grad_params)


# ------------------------------------------------------------------------------------------------
# The block
# ------------------------------------------------------------------------------------------------
class MonotoneBlock(iResBlock):
    """Monotone (Cayley) block ``y = sqrt(2) w - x`` with ``w + g(w) = sqrt(2) x`` (``--monotone_resolvent True``).

    Takes :class:`iResBlock`'s arguments (the branch, the estimator's settings), so a caller chooses the class and
    keeps everything else; the state_dict keys are the residual block's. Its own settings are attributes:
    ``inverse_atol``, ``inverse_rtol``, ``inverse_max_iters`` (the forward and inverse solves' stopping rule; the
    constructor arguments, default :data:`MONOTONE_SOLVE_TOL` / :data:`MONOTONE_SOLVE_MAX_ITERS`),
    ``adjoint_atol``, ``adjoint_rtol``, ``adjoint_max_iters`` (the adjoint solve), and ``inverse_method``
    (``'fixed-point'`` or ``'anderson'``, for every solve of the block). ``last_solve_iters``,
    ``last_adjoint_iters`` and ``last_inverse_iters`` count the evaluations of ``g`` of the last solves.

    The branch must act on each sample independently and deterministically (no batch norm, no dropout): the
    solves evaluate it many times.
    """

    def __init__(self, nnet: nn.Module, *args, inverse_atol: float = MONOTONE_SOLVE_TOL, inverse_rtol: float = MONOTONE_SOLVE_TOL,
                 inverse_max_iters: int = MONOTONE_SOLVE_MAX_ITERS, **kwargs):
        super().__init__(nnet, *args, inverse_atol=inverse_atol, inverse_rtol=inverse_rtol, inverse_max_iters=inverse_max_iters,
                         **kwargs)
        self.adjoint_atol, self.adjoint_rtol, self.adjoint_max_iters = ADJOINT_ATOL, ADJOINT_RTOL, ADJOINT_MAX_ITERS
        self.last_solve_iters = 0
        self.last_adjoint_iters = 0

    # -- solves ------------------------------------------------------------------------------
    @torch.no_grad()
    def _solve(self, b: Tensor, sign: float) -> Tensor:
        """``w = b + sign * g(w)`` from ``w0 = b`` (sign -1: forward, +1: inverse)."""
        w, iters, ok = solve_fixed_point(lambda w: torch.add(b, self.nnet(w), alpha=sign), b, self.inverse_atol,
                                         self.inverse_rtol, self.inverse_max_iters, self.inverse_method)
        if sign < 0:
            self.last_solve_iters = iters
        else:
            self.last_inverse_iters = iters
        self._warn_unconverged(ok, "forward" if sign < 0 else "inverse")
        return w

    def _warn_unconverged(self, ok: Tensor, which: str) -> None:
        if not bool(ok.all()):
            warnings.warn(f"MonotoneBlock {which} solve stopped before its tolerance for {int((~ok).sum())} sample(s) "
                          f"(iteration cap or round-off)", SolveNotConvergedWarning, stacklevel=3)

    def _params(self) -> List[Tensor]:
        return [p for p in self.nnet.parameters() if p.requires_grad]

    def solve(self, x: Tensor) -> Tensor:
        """``w`` with ``w + g(w) = sqrt(2) x``, differentiable in ``x`` and the parameters by implicit differentiation."""
        b = SQRT2 * x
        params = self._params()
        if torch.is_grad_enabled() and (x.requires_grad or params):
            return _ImplicitSolve.apply(self, b, *params)
        return self._solve(b, -1.0)

    # -- flow-layer contract ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        w = self.solve(x)
        return SQRT2 * w - x, self.logdet_at(w)

    def transform(self, x: Tensor) -> Tensor:
        return SQRT2 * self.solve(x) - x

    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        with torch.no_grad():
            w = self._solve(SQRT2 * y, 1.0)
        return SQRT2 * w - y, -self.logdet_at(w)

    @torch.no_grad()
    def invert(self, y: Tensor) -> Tensor:
        return SQRT2 * self._solve(SQRT2 * y, 1.0) - y

    # -- log-det ----------------------------------------------------------------------------------
    def logdet_at(self, w: Tensor) -> Tensor:
        """``log det(I - J) - log det(I + J)`` at ``w`` (estimated, or exact with ``brute_force`` / 2-D evaluation)."""
        params = self._params()
        need_graph = torch.is_grad_enabled() and (w.requires_grad or bool(params))
        if self._uses_brute_force(w):
            return self._exact_logdet(w, need_graph, None)
        weights, draws = self.series_plan()
        if self.exact_trace:
            logdet = self._exact_logdet(w, need_graph, weights)
        else:
            v = self.probe_fn(w) if self.probe_fn is not None else torch.randn_like(w)
            if not need_graph:
                logdet = self._estimate_no_graph_monotone(w, v, weights)
            elif self.training and self.grad_in_forward:
                fn = _LinearizedMonotoneLogDet if (self.neumann_grad and self.linearizable) else _DeferredMonotoneLogDet
                logdet = fn.apply(self, w, v, weights, *params)
            elif self.training and self.neumann_grad:
                logdet = self._estimate_neumann_monotone(w, v, weights)
            else:
                w_ = w if w.requires_grad else w.detach().requires_grad_(True)
                logdet = _basic_series_with_graph(self.nnet(w_), w_, v, residual_weights(weights))
        if self.training:
            self._record(logdet.detach(), draws)
        return logdet

    def _estimate_no_graph_monotone(self, w: Tensor, v: Tensor, weights: Sequence[float]) -> Tensor:
        if self.linearizable:
            _, tape = linearize.primal(self.nnet, w)
            return monotone_series(lambda t: linearize.tape_vjp(tape, t), v, weights, neumann=False)[0]
        with torch.enable_grad():
            w_ = w.detach().requires_grad_(True)
            g = self.nnet(w_)
            vjp = lambda t: torch.autograd.grad(g, w_, t, retain_graph=True)[0]  # noqa: E731
            return monotone_series(vjp, v, weights, neumann=False)[0].detach()

    def _estimate_neumann_monotone(self, w: Tensor, v: Tensor, weights: Sequence[float]) -> Tensor:
        w_ = w if w.requires_grad else w.detach().requires_grad_(True)
        g = self.nnet(w_)
        vjp = lambda t: torch.autograd.grad(g, w_, t, retain_graph=True)[0]  # noqa: E731
        with torch.no_grad():
            estimate, s = monotone_series(vjp, v, weights, neumann=True)
        (sj,) = torch.autograd.grad(g, w_, s, create_graph=True, retain_graph=True)
        surrogate = _dot(sj, v)
        # Value: the unbiased estimate; gradient: the Neumann estimator through one differentiated product.
        return estimate + (surrogate - surrogate.detach())

    def _exact_logdet(self, w: Tensor, need_graph: bool, weights: Optional[Sequence[float]]) -> Tensor:
        with torch.enable_grad():
            w_ = w if (need_graph and w.requires_grad) else w.detach().requires_grad_(True)
            jac = batch_jacobian(self.nnet(w_), w_, create_graph=need_graph)
        if weights is None:
            eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
            logdet = logabsdet(eye - jac) - logabsdet(eye + jac)
        else:  # the series with exact traces of J^k (small inputs)
            logdet = jac.new_zeros(jac.shape[0])
            jac_k = jac
            for k, c in enumerate(residual_weights(weights), start=1):
                if k > 1:
                    jac_k = torch.bmm(jac, jac_k)
                if c:
                    logdet = logdet + c / k * torch.diagonal(jac_k, dim1=-2, dim2=-1).sum(-1)
        return logdet if need_graph else logdet.detach()

    def extra_repr(self) -> str:
        return "monotone (Cayley), " + super().extra_repr()
