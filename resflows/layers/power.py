"""The lock-step power-iteration scheduler: runs the generalised power method of many normalised layers
(:mod:`resflows.layers.lipschitz`) together, with one host synchronisation per convergence check instead of
one per layer and step, and one batched matrix product per group of same-shaped 2-norm layers.

It relies only on the layers' power-method interface: ``iterative`` (has power vectors), ``batchable``
(a 2 -> 2 norm of a plain matrix ``weight.reshape(out, -1)``), ``power_step(atol, rtol)``,
``refresh_scale()`` and the buffers ``u``, ``v``, ``scale``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .lipschitz import LipschitzMap

__all__ = ["update_lipschitz", "MAX_POWER_ITERATIONS", "INIT_RESTARTS", "INIT_POWER_ITERATIONS", "INIT_TOLERANCE",
           "TIGHT_LIPSCHITZ", "TOY_TOLERANCE", "TOY_VALIDATION_ITERATIONS"]

# Every power-iteration budget lives here. What a model runs after each optimiser step comes from its
# ``lipschitz_defaults()`` (``--n-lipschitz-iters`` / ``--sn-tol``, or the toy's ``--atol`` / ``--rtol``);
# the layers store no settings of their own.

# Cap on the steps of a tolerance-driven update.
MAX_POWER_ITERATIONS = 200
# At construction the power method runs from INIT_RESTARTS + 1 random starts (p != 2 can stop at a local
# maximum), each for at most INIT_POWER_ITERATIONS steps to a tolerance of INIT_TOLERANCE, and keeps the best.
INIT_RESTARTS = 10
INIT_POWER_ITERATIONS = 200
INIT_TOLERANCE = 1e-4
# Power iterations run to convergence before a final evaluation (train_img.py --evaluate) and for EMA
# weights loaded with load_model(ema=True): the spectral norms, hence the log-dets, are then exact to 1e-6.
# --precision bf16: power steps that measure each rounded normalised weight's norm, once per step and layer, from
# the float32 weight's vectors (resflows/layers/precision.py rescales where it exceeds coeff).
ROUNDED_NORM_STEPS = 5
TIGHT_LIPSCHITZ = dict(atol=1e-6, rtol=1e-6, max_iterations=2000)
# train_toy.py with --n-lipschitz-iters None and neither --atol nor --rtol: iterate to this tolerance.
TOY_TOLERANCE = 1e-3
# Power iterations before each validation of train_toy.py, as the paper's toy script.
TOY_VALIDATION_ITERATIONS = 200
# On accelerators the convergence flags are read every this many steps: each read is a host synchronisation.
ACCELERATOR_CHECK_EVERY = 2


@torch.no_grad()
def update_lipschitz(
    layers: Iterable["LipschitzMap"],
    n_iterations: Optional[int] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    max_iterations: int = MAX_POWER_ITERATIONS,
) -> int:
    """Power iterations on many layers in lock-step, then refresh each layer's ``scale``.

    With ``n_iterations`` set, exactly that many steps run. Otherwise steps run until every layer's
    ``u`` and ``v`` change by less than ``atol + rtol * max|.|`` (RMS change), at most
    ``max_iterations``. Convergence flags of all layers are gathered in one host transfer, taken every
    iteration on CPU and every ``ACCELERATOR_CHECK_EVERY`` iterations on accelerators, so there is no
    per-layer, per-iteration synchronisation. Returns the number of iterations run.
    """
    layers = list(layers)
    iterative = [m for m in layers if m.iterative]
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
        every = 1 if on_cpu else ACCELERATOR_CHECK_EVERY
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


def _groups(layers: Sequence["LipschitzMap"]):
    """Batchable layers grouped by weight shape, dtype and device (groups of one are left alone)."""
    groups: dict = {}
    for m in layers:
        if m.batchable:
            groups.setdefault((tuple(m.weight.shape), m.weight.dtype, m.weight.device), []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def _stacked(group):
    """The group's matrices ``[G, out, in]`` and power vectors ``[G, out]``, ``[G, in]``."""
    w = torch.stack([m.weight.detach().reshape(m.weight.shape[0], -1) for m in group])
    return w, torch.stack([m.u for m in group]), torch.stack([m.v for m in group])


@torch.no_grad()
def _batched_power_steps(layers: Sequence["LipschitzMap"], n: int) -> List["LipschitzMap"]:
    """``n`` plain 2-norm power steps on every group of same-shaped layers at once (the toy model has 500
    such layers: one small kernel per layer and step cost more than the arithmetic). Same steps as
    ``power_step``; returns the layers left for it."""
    groups = _groups(layers)
    done = {id(m) for g in groups for m in g}
    for g in groups:
        w, u, v = _stacked(g)
        for _ in range(n):
            u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), p=2, dim=1)
            v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), p=2, dim=1)
        torch._foreach_copy_([m.u for m in g], list(u.unbind(0)))
        torch._foreach_copy_([m.v for m in g], list(v.unbind(0)))
    return [m for m in layers if id(m) not in done]


@torch.no_grad()
def _refresh_scales(layers: Sequence["LipschitzMap"]) -> None:
    """``refresh_scale`` of every layer, batched over groups of same-shaped 2-norm layers."""
    groups = _groups(layers)
    done = {id(m) for g in groups for m in g}
    for g in groups:
        w, u, v = _stacked(g)
        sigma = (u * torch.bmm(w, v.unsqueeze(2)).squeeze(2)).sum(1)
        torch._foreach_copy_([m.scale for m in g], list(sigma.unbind(0)))
    for m in layers:
        if id(m) not in done:
            m.refresh_scale()
