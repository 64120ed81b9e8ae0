"""Maintenance methods shared by the whole-flow models (``ResidualFlow``, ``ToyFlow``): the model owns
its upkeep (power iterations after each optimiser step, Lipschitz and norm-order reports, estimator
moments, the inverse method, i-DenseNet concatenation weights) instead of scripts scanning its modules."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .dense import LipschitzDenseLayer
from .iresblock import iResBlock
from .lipschitz import LipschitzMap, lipschitz_layers
from .power import MAX_POWER_ITERATIONS, update_lipschitz

__all__ = ["FlowUpkeep", "INVERSE_METHODS"]

INVERSE_METHODS = ("fixed-point", "anderson")


class FlowUpkeep(nn.Module):
    """Base (or mixin, before another module class) of a whole flow. Subclasses say how to run the power method by default
    (:meth:`lipschitz_defaults`)."""

    def lipschitz_defaults(self) -> Dict[str, Any]:  # pragma: no cover - interface
        """``dict(n_iterations=..., atol=..., rtol=...)`` used by ``update_lipschitz()`` without arguments."""
        raise NotImplementedError

    def update_lipschitz(self, n_iterations: Optional[int] = None, atol: Optional[float] = None,
                         rtol: Optional[float] = None, max_iterations: int = MAX_POWER_ITERATIONS) -> int:
        """Power iterations on every normalised layer (after each optimiser step), warm-started; returns the
        iterations run. Without ``n_iterations`` and tolerances, the model's :meth:`lipschitz_defaults`."""
        if n_iterations is None and atol is None and rtol is None:
            d = self.lipschitz_defaults()
            n_iterations, atol, rtol = d.get("n_iterations"), d.get("atol"), d.get("rtol")
        return update_lipschitz(lipschitz_layers(self), n_iterations, atol, rtol, max_iterations)

    def lipschitz_constants(self) -> Dict[str, float]:
        """Lipschitz bound of every normalised layer: min(sigma, coeff) from the stored estimate."""
        return {n: m.lipschitz_constant() for n, m in self.named_modules() if isinstance(m, LipschitzMap)}

    def norm_orders(self) -> Dict[str, Tuple[float, float]]:
        """(domain, codomain) norm orders of every normalised layer (they change in training with learned orders)."""
        return {n: m.norm_orders() for n, m in self.named_modules() if isinstance(m, LipschitzMap)}

    def iresblocks(self) -> List[iResBlock]:
        """Every residual block, in module order."""
        return [m for m in self.modules() if isinstance(m, iResBlock)]

    def estimator_moments(self) -> Dict[str, Tuple[float, float]]:
        """(first, second) moment of each residual block's last log-det estimate."""
        return {
            n: (float(m.last_firmom), float(m.last_secmom))
            for n, m in self.named_modules()
            if isinstance(m, iResBlock)
        }

    def solver_iterations(self) -> Dict[str, Dict[str, int]]:
        """Evaluations of the branch in the last forward, adjoint and inverse solves of each monotone block."""
        return {n: {"forward": m.last_solve_iters, "adjoint": m.last_adjoint_iters, "inverse": m.last_inverse_iters}
                for n, m in self.named_modules() if hasattr(m, "last_adjoint_iters")}

    def set_inverse_method(self, method: str) -> None:
        """``'fixed-point'`` (the paper's iteration) or ``'anderson'`` in every residual block's inverse."""
        if method not in INVERSE_METHODS:
            raise ValueError(f"inverse method must be 'fixed-point' or 'anderson', got {method!r}")
        for block in self.iresblocks():
            block.inverse_method = method

    def reset_concatenation(self) -> None:
        """Put every dense layer's concatenation weights K back to their initial value (i-DenseNets
        do this after each step of the first --start_learnable_concat epochs)."""
        for m in self.modules():
            if isinstance(m, LipschitzDenseLayer):
                m.reset_concat()

    def concatenation_weights(self) -> Dict[str, Tuple[float, float]]:
        """(eta1, eta2) of every dense layer."""
        out = {}
        with torch.no_grad():
            for n, m in self.named_modules():
                if isinstance(m, LipschitzDenseLayer):
                    e1, e2 = m.etas()
                    out[n] = (float(e1), float(e2))
        return out
