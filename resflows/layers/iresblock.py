"""The invertible residual block ``y = x + g(x)`` and its log-determinant estimators.

For ``Lip(g) < 1`` (Behrmann et al. 2019) the block is invertible and

    log|det(I + J_g)| = sum_{k>=1} (-1)^{k+1} / k * tr(J_g^k).                     (Chen et al. 2019, eq. 6)

Residual Flows estimate this without bias with a Hutchinson probe ``v ~ N(0, I)`` (``tr(A) = E v^T A v``)
and a Russian-roulette truncation: draw ``N`` (Poisson or geometric), keep ``n_exact_terms`` terms with
weight 1 and weight term ``k`` by ``1[N >= k - n_exact] / P(N >= k - n_exact)`` (eq. 7), so every term
has expectation-one weight and the estimate is unbiased.

Gradients (Sec. 3.3): ``d log det(I + J) = tr((I + J)^{-1} dJ)`` with the Neumann series
``(I + J)^{-1} = sum_k (-J)^k`` truncated by the same roulette (eq. 8). Only one Jacobian-vector product
carries a graph, so memory does not grow with the number of terms. With ``grad_in_forward`` (the paper's
"backward-in-forward", our ``--mem-eff``) the estimator's graph never outlives one block: the series runs
without a graph in the forward pass and the single differentiated product is formed in this block's own
backward pass, weighted by each sample's own upstream gradient (the paper's code scaled every sample by
the first sample's, exact only for a batch mean).
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import linearize, precision
from .base import FlowLayer, HostCopy
from .jacobian import batch_jacobian, logabsdet

Tensor = torch.Tensor

__all__ = [
    "iResBlock",
    "roulette_weights",
    "geometric_tail",
    "poisson_tail",
    "InverseNotConvergedWarning",
]


class InverseNotConvergedWarning(RuntimeWarning):
    """The fixed-point inverse of a residual block stopped at its iteration cap."""


# ------------------------------------------------------------------------------------------------
# Russian roulette
# ------------------------------------------------------------------------------------------------
def geometric_tail(p: float, k: int) -> float:
    """P(N >= k) for N ~ Geometric(p) on {1, 2, ...}."""
    return (1.0 - p) ** max(k - 1, 0)


def poisson_tail(lamb: float, k: int) -> float:
    """P(N >= k) for N ~ Poisson(lamb)."""
    if k <= 0:
        return 1.0
    cdf = sum(math.exp(-lamb) * lamb**i / math.factorial(i) for i in range(k))
    return max(1.0 - cdf, 0.0)


def roulette_weights(draws: Sequence[int], n_exact: int, tail: Callable[[int], float]) -> List[float]:
    """Weights w_1..w_K of the series terms, K = max(draws) + n_exact (eq. 7):
    w_k = 1 for k <= n_exact, else mean_i 1[N_i >= k - n_exact] / P(N >= k - n_exact)."""
    draws = [int(d) for d in draws]
    n_terms = max(draws) + n_exact
    weights = []
    for k in range(1, n_terms + 1):
        if k <= n_exact:
            weights.append(1.0)
        else:
            m = k - n_exact
            frac = sum(d >= m for d in draws) / len(draws)
            weights.append(frac / tail(m))
    return weights


def _batch_trace(m: Tensor) -> Tensor:
    return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-example inner product."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _bcast(w: Tensor, like: Tensor) -> Tensor:
    return w.reshape(-1, *([1] * (like.dim() - 1)))


# ------------------------------------------------------------------------------------------------
# Power series with a Hutchinson probe
# ------------------------------------------------------------------------------------------------
def _series(vjp: Callable[[Tensor], Tensor], v: Tensor, weights: Sequence[float], neumann: bool):
    """Run the series without a graph. Returns (estimate, neumann_vector or None):
    estimate = sum_k (-1)^{k+1} w_k / k * v^T J^k v and, for the Neumann gradient,
    neumann_vector = sum_{k=0}^{K} (-1)^k w_k v^T J^k  (w_0 = 1)."""
    estimate = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    w_t = v
    nv = v.clone() if neumann else None
    for k, w in enumerate(weights, start=1):
        w_t = vjp(w_t)  # v^T J^k
        estimate = estimate + ((-1) ** (k + 1)) * w / k * _dot(w_t, v)
        if neumann:
            nv.add_(w_t, alpha=((-1) ** k) * w)
    return estimate, nv


class _DeferredLogDet(torch.autograd.Function):
    """Log-det estimate whose gradient is formed in this block's backward pass (``--mem-eff``).

    Forward: ``g = nnet(x)`` with its graph, the series without a graph. Backward: one
    differentiated Jacobian-vector product weighted per sample by the upstream gradient, then a
    single combined backward for ``g`` and the log-det. Exact for any loss.
    """

    @staticmethod
    def forward(ctx, block: "iResBlock", x: Tensor, v: Tensor, weights: List[float], *params: Tensor):
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            g = block.nnet(x_)
        vjp = lambda w: torch.autograd.grad(g, x_, w, retain_graph=True)[0]  # noqa: E731
        with torch.no_grad():
            estimate, nv = _series(vjp, v, weights, neumann=block.neumann_grad)
        # Plain attributes, not save_for_backward: g must keep its graph for the backward pass.
        ctx.block, ctx.g, ctx.x, ctx.v, ctx.nv, ctx.weights = block, g, x_, v, nv, weights
        return g.detach(), estimate

    @staticmethod
    def backward(ctx, grad_g: Tensor, grad_logdet: Tensor):
        block, g, x_, v, nv = ctx.block, ctx.g, ctx.x, ctx.v, ctx.nv
        params = [p for p in block.nnet.parameters() if p.requires_grad]
        with torch.enable_grad():
            if block.neumann_grad:
                (vjp_jac,) = torch.autograd.grad(g, x_, nv * _bcast(grad_logdet, nv), create_graph=True, retain_graph=True)
                logdet_term = (vjp_jac * v).sum()
            else:
                # The plain series needs its graph: rebuild it for this block only.
                logdet = _basic_series_with_graph(g, x_, v, ctx.weights)
                logdet_term = (logdet * grad_logdet).sum()
            total = logdet_term + (g * grad_g).sum()
            grads = torch.autograd.grad(total, [x_] + params, allow_unused=True)
        ctx.g = ctx.x = ctx.v = ctx.nv = None  # free this block's graph now
        grad_x, grad_params = grads[0], grads[1:]
        grad_params = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, grad_params)]
        return (None, grad_x, None, None, *grad_params)


class _LinearizedNeumannLogDet(torch.autograd.Function):
    """The default training path (Neumann gradient, ``--mem-eff``) for branches that
    :mod:`resflows.layers.linearize` supports.

    Forward: ``g(x)`` without a graph, the series from hand-written vector-Jacobian products. Only ``x``, the
    probe ``v`` and the Neumann vector ``u`` are kept. Backward: one differentiable forward-mode pass rebuilds
    ``g(x)`` and ``J v``, and a single first-order backward of ``sum(grad_g * g) + sum(c_i u_i^T J_i v_i)``
    gives every gradient, each sample weighted by its own upstream gradient ``c_i``.
    """

    @staticmethod
    def forward(ctx, block: "iResBlock", x: Tensor, v: Tensor, weights: List[float], *params: Tensor):
        passes = block.passes
        g, tape = passes.primal(block.nnet, x)
        estimate, nv = _series(lambda w: passes.tape_vjp(tape, w), v, weights, neumann=True)
        ctx.block, ctx.tape = block, passes.strip_tape(tape)
        ctx.dtype = precision.current_dtype()  # the backward's recomputation runs in the same precision
        ctx.save_for_backward(x, v, nv)
        return g, estimate

    @staticmethod
    def backward(ctx, grad_g: Tensor, grad_logdet: Tensor):
        x, v, nv = ctx.saved_tensors
        params = [p for p in ctx.block.nnet.parameters() if p.requires_grad]
        with torch.enable_grad(), precision.branch_dtype(ctx.dtype):
            x_ = x.detach().requires_grad_(True)
            g, jv = ctx.block.passes.dual(ctx.block.nnet, x_, v, ctx.tape)
            total = (g * grad_g).sum() + (nv * _bcast(grad_logdet, nv) * jv).sum()
            grads = torch.autograd.grad(total, [x_] + params, allow_unused=True)
        ctx.tape = None
        grad_params = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, grads[1:])]
        return (None, grads[0], None, None, *grad_params)


def _basic_series_with_graph(g: Tensor, x: Tensor, v: Tensor, weights: Sequence[float]) -> Tensor:
    """sum_k (-1)^{k+1} w_k / k v^T J^k v with the whole series differentiable (naive gradients)."""
    logdet = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    w_t = v
    for k, w in enumerate(weights, start=1):
        (w_t,) = torch.autograd.grad(g, x, w_t, create_graph=True, retain_graph=True)
        logdet = logdet + ((-1) ** (k + 1)) * w / k * _dot(w_t, v)
    return logdet


# ------------------------------------------------------------------------------------------------
# The block
# ------------------------------------------------------------------------------------------------
class iResBlock(FlowLayer):  # noqa: N801 - the paper's name
    """Invertible residual block ``y = x + g(x)`` with ``Lip(g) < 1``.

    Args:
        nnet: the residual branch ``g`` (built from Lipschitz-normalised layers).
        geom_p, lamb: parameters of the geometric / Poisson truncation distributions (stored as frozen
            parameters for state_dict compatibility; they receive no gradient).
        n_power_series: ``None`` for the unbiased Russian-roulette estimate in training, or the number of
            terms of a truncated (biased) series.
        exact_trace: use exact traces of J^k (full Jacobian; small inputs only).
        brute_force: exact log-det from the full Jacobian (2x2 closed form for 2-D inputs). In evaluation
            2-D inputs always use it, as in the paper's code.
        n_samples: number of draws of N; the series has max(N) + n_exact_terms terms.
        n_exact_terms: leading terms always computed with weight 1.
        n_dist: ``'poisson'`` or ``'geometric'``.
        neumann_grad: Neumann-series gradient estimator in training.
        grad_in_forward: memory-efficient log-det gradients (``--mem-eff``).
        inverse_atol, inverse_rtol, inverse_max_iters: stopping rule of the fixed-point inverse (the attribute
            ``inverse_method``, 'fixed-point' or 'anderson', picks the iteration).
        eval_exact_terms: exact terms used in evaluation (20 in the paper).
    """

    def __init__(
        self,
        nnet: nn.Module,
        geom_p: float = 0.5,
        lamb: float = 2.0,
        n_power_series: Optional[int] = None,
        exact_trace: bool = False,
        brute_force: bool = False,
        n_samples: int = 1,
        n_exact_terms: int = 2,
        n_dist: str = "geometric",
        neumann_grad: bool = True,
        grad_in_forward: bool = False,
        inverse_atol: float = 1e-5,
        inverse_rtol: float = 1e-5,
        inverse_max_iters: int = 1000,
        eval_exact_terms: int = 20,
    ):
        super().__init__()
        if n_dist not in ("poisson", "geometric"):
            raise ValueError(f"n_dist must be 'poisson' or 'geometric', got {n_dist!r}")
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.nnet = nnet
        precision.mark_stream_output(nnet)  # its last map stays float32 under --precision bf16
        self.n_dist = n_dist
        # Frozen by design: present for state_dict compatibility with the paper's checkpoints.
        self.geom_p = nn.Parameter(torch.tensor(math.log(geom_p) - math.log(1.0 - geom_p), dtype=torch.float64), requires_grad=False)
        self.lamb = nn.Parameter(torch.tensor(float(lamb)), requires_grad=False)
        self.n_samples = n_samples
        self.n_power_series = n_power_series
        self.exact_trace = exact_trace
        self.brute_force = brute_force
        self.n_exact_terms = n_exact_terms
        self.neumann_grad = neumann_grad
        self.grad_in_forward = grad_in_forward
        self.inverse_atol, self.inverse_rtol, self.inverse_max_iters = inverse_atol, inverse_rtol, inverse_max_iters
        self.inverse_method = "fixed-point"  # or "anderson" (resflows/layers/anderson.py)
        self.eval_exact_terms = eval_exact_terms
        # Draws of N come from this torch generator (CPU: the series length is needed on the host
        # anyway, so no device synchronisation); None means torch's default CPU generator, which
        # torch.manual_seed seeds.
        self.generator: Optional[torch.Generator] = None
        # Hutchinson probes: torch.randn_like on the input's device unless a function x -> probe is set
        # (e.g. probes fixed per example, to compare runs that must draw the same noise).
        self.probe_fn: Optional[Callable[[Tensor], Tensor]] = None
        self.last_inverse_iters = 0
        self._linearizable: Optional[bool] = None
        self.use_linearize = True  # False forces the generic autograd path (used to cross-check it)
        # The linearised training passes compiled (resflows.layers.compiled, --compile); None: eager.
        self.compiled_passes = None
        self._p_host, self._lamb_host = HostCopy(), HostCopy()  # read once per value, not per step (GPU sync)
        self.register_buffer("last_n_samples", torch.zeros(n_samples))
        self.register_buffer("last_firmom", torch.zeros(1))
        self.register_buffer("last_secmom", torch.zeros(1))

    # -- truncation ----------------------------------------------------------------------------
    def _geom_p_value(self) -> float:
        return self._p_host.get(self.geom_p, lambda t: float(torch.sigmoid(t.detach())))

    def _lamb_value(self) -> float:
        return self._lamb_host.get(self.lamb, lambda t: float(t.detach()))

    def _tail(self) -> Callable[[int], float]:
        if self.n_dist == "geometric":
            p = self._geom_p_value()
            return lambda k: geometric_tail(p, k)
        lamb = self._lamb_value()
        return lambda k: poisson_tail(lamb, k)

    def _draw(self) -> List[int]:
        n = self.n_samples
        if self.n_dist == "geometric":
            p = self._geom_p_value()
            draws = torch.empty(n, dtype=torch.float64).geometric_(p, generator=self.generator)
        else:
            draws = torch.poisson(torch.full((n,), self._lamb_value(), dtype=torch.float64), generator=self.generator)
        return [int(d) for d in draws.tolist()]

    def series_plan(self) -> Tuple[List[float], Optional[List[int]]]:
        """Term weights w_1..w_K for the current mode, and the draws of N (None if truncated)."""
        if self.training and self.n_power_series is not None:
            return [1.0] * self.n_power_series, None
        offset = self.n_exact_terms if self.training else self.eval_exact_terms
        draws = self._draw()
        return roulette_weights(draws, offset, self._tail()), draws

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        g, logdet = self._g_and_logdet(x)
        return x + g, logdet

    def transform(self, x: Tensor) -> Tensor:
        return x + self.nnet(x)

    def _uses_brute_force(self, x: Tensor) -> bool:
        two_d = x.dim() == 2 and x.shape[1] == 2
        return self.brute_force or (not self.training and two_d)

    def _g_and_logdet(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        need_graph = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.nnet.parameters())
        )
        if self._uses_brute_force(x):
            return self._exact(x, need_graph, brute_force=True)
        weights, draws = self.series_plan()
        if self.exact_trace:
            g, logdet = self._exact(x, need_graph, brute_force=False, weights=weights)
        else:
            v = self.probe_fn(x) if self.probe_fn is not None else torch.randn_like(x)
            if not need_graph:
                g, logdet = self._estimate_no_graph(x, v, weights)
            elif self.training and self.grad_in_forward:
                params = [p for p in self.nnet.parameters() if p.requires_grad]
                fn = _LinearizedNeumannLogDet if (self.neumann_grad and self.linearizable) else _DeferredLogDet
                g, logdet = fn.apply(self, x, v, weights, *params)
            elif self.training and self.neumann_grad:
                g, logdet = self._estimate_neumann(x, v, weights)
            else:
                x_ = x if x.requires_grad else x.detach().requires_grad_(True)
                g = self.nnet(x_)
                logdet = _basic_series_with_graph(g, x_, v, weights)
        if self.training:
            self._record(logdet.detach(), draws)
        return g, logdet

    @property
    def linearizable(self) -> bool:
        """Whether the residual branch has a hand-written linearisation (faster products, less memory)."""
        if self._linearizable is None:
            self._linearizable = linearize.supports(self.nnet)
        return self._linearizable and self.use_linearize

    @property
    def passes(self):
        """primal / tape_vjp / dual / strip_tape of the default training path: compiled, or linearize's."""
        return linearize if self.compiled_passes is None else self.compiled_passes

    def _estimate_no_graph(self, x: Tensor, v: Tensor, weights: Sequence[float]) -> Tuple[Tensor, Tensor]:
        if self.linearizable:
            g, tape = linearize.primal(self.nnet, x)
            estimate, _ = _series(lambda w: linearize.tape_vjp(tape, w), v, weights, neumann=False)
            return g, estimate
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            g = self.nnet(x_)
            vjp = lambda w: torch.autograd.grad(g, x_, w, retain_graph=True)[0]  # noqa: E731
            estimate, _ = _series(vjp, v, weights, neumann=False)
        return g.detach(), estimate.detach()

    def _estimate_neumann(self, x: Tensor, v: Tensor, weights: Sequence[float]) -> Tuple[Tensor, Tensor]:
        x_ = x if x.requires_grad else x.detach().requires_grad_(True)
        g = self.nnet(x_)
        vjp = lambda w: torch.autograd.grad(g, x_, w, retain_graph=True)[0]  # noqa: E731
        with torch.no_grad():
            estimate, nv = _series(vjp, v, weights, neumann=True)
        (vjp_jac,) = torch.autograd.grad(g, x_, nv, create_graph=True, retain_graph=True)
        surrogate = _dot(vjp_jac, v)
        # Value: the unbiased log-det estimate; gradient: the Neumann estimator (eq. 8).
        return g, estimate + (surrogate - surrogate.detach())

    def _exact(self, x: Tensor, need_graph: bool, brute_force: bool, weights: Optional[Sequence[float]] = None):
        with torch.enable_grad():
            x_ = x if (need_graph and x.requires_grad) else x.detach().requires_grad_(True)
            g = self.nnet(x_)
            jac = batch_jacobian(g, x_, create_graph=need_graph)
        if brute_force:
            if jac.shape[-1] == 2:
                det = (jac[:, 0, 0] + 1) * (jac[:, 1, 1] + 1) - jac[:, 0, 1] * jac[:, 1, 0]
                logdet = torch.log(torch.abs(det))
            else:
                eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
                logdet = logabsdet(eye + jac)
        else:
            logdet = jac.new_zeros(jac.shape[0])
            jac_k = jac
            for k, w in enumerate(weights, start=1):
                if k > 1:
                    jac_k = torch.bmm(jac, jac_k)
                logdet = logdet + ((-1) ** (k + 1)) / k * w * _batch_trace(jac_k)
        if not need_graph:
            return g.detach(), logdet.detach()
        return g, logdet

    @torch.no_grad()
    def _record(self, estimate: Tensor, draws: Optional[List[int]]) -> None:
        if draws is not None:
            # non_blocking: from host memory, a blocking copy to a GPU would wait for the device
            self.last_n_samples.copy_(torch.tensor(draws, dtype=self.last_n_samples.dtype), non_blocking=True)
        self.last_firmom.copy_(estimate.mean().reshape(1).to(self.last_firmom))
        self.last_secmom.copy_((estimate**2).mean().reshape(1).to(self.last_secmom))

    # -- inverse -------------------------------------------------------------------------------
    def inverse(self, y: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.invert(y)
        _, logdet = self._g_and_logdet(x)
        return x, -logdet

    @torch.no_grad()
    def invert(self, y: Tensor) -> Tensor:
        """Fixed-point inverse x <- y - g(x) from x0 = y - g(y) (Behrmann et al. 2019, Alg. 1), or its Anderson
        acceleration when ``inverse_method == 'anderson'`` (same stopping rule, fewer evaluations of g).

        The stopping rule is the paper's: stop when every element's *squared* step ``(x_k - x_{k-1})^2`` is below
        the *linear* tolerance ``inverse_atol + inverse_rtol |y|`` (1e-5 each). So it stops at steps of about
        ``sqrt(1e-5 (1 + |y|))``, ~3e-3 rather than 1e-5; since ``g`` is a contraction with Lipschitz constant
        ``L``, the error left is at most ``L / (1 - L)`` times the last step: of order 1e-3 far from the bound
        (8e-4 on the L < 0.61 block of ``tests/layers/test_iresblock.py``, which checks < 5e-3), more near it.
        For an accuracy ``e`` set ``inverse_atol`` to ``e^2`` (and ``inverse_rtol`` to 0): 1e-20 for about 1e-10."""
        tol = self.inverse_atol + y.abs() * self.inverse_rtol
        if self.inverse_method == "anderson":
            from .anderson import anderson_fixed_point

            x, self.last_inverse_iters, ok = anderson_fixed_point(lambda x: y - self.nnet(x), y, tol, self.inverse_max_iters)
            if not ok:
                warnings.warn(f"iResBlock Anderson inverse did not converge in {self.inverse_max_iters} evaluations; "
                              f"the sample may be inaccurate", InverseNotConvergedWarning, stacklevel=2)
            return x
        x_prev, x = y, y - self.nnet(y)
        it = 1
        while not torch.all((x - x_prev) ** 2 / tol < 1):
            if it >= self.inverse_max_iters:
                residual = float((x - x_prev).abs().max())
                warnings.warn(
                    f"iResBlock fixed-point inverse did not converge in {self.inverse_max_iters} iterations "
                    f"(max |x_k - x_k-1| = {residual:.3g}); the sample may be inaccurate",
                    InverseNotConvergedWarning,
                    stacklevel=2,
                )
                break
            x_prev, x = x, y - self.nnet(x)
            it += 1
        self.last_inverse_iters = it
        return x

    def extra_repr(self) -> str:
        mode = "truncated n={}".format(self.n_power_series) if self.n_power_series else f"unbiased {self.n_dist}"
        return (f"{mode}, n_samples={self.n_samples}, n_exact_terms={self.n_exact_terms}, neumann_grad={self.neumann_grad}, "
                f"mem_eff={self.grad_in_forward}")
