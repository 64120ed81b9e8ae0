"""``--compile``: the default training path's per-block passes through ``torch.compile`` (inductor).

Three functions are compiled, once for every residual block of a shape, because they take the branch as an
argument and torch lifts its parameters and buffers into graph inputs (guards check types, shapes and
constants such as the padding, not which module it is):

* ``primal(nnet, x)``: the branch without a graph, recording its tape (``resflows.layers.linearize.primal``);
* ``tape_vjp(tape, w)``: one vector-Jacobian product ``w^T J`` from the tape, called once per series term in a
  Python loop, so the random number of terms never changes a graph;
* ``dual(nnet, x, t, tape)``: the differentiable forward-mode pass ``(g(x), J t)`` (and, through AOT autograd,
  its backward: the first-order backward of the block's Neumann-gradient term).

The weights are used as they are (any dtype); the module tree, state_dict keys and the eager code paths are
unchanged, so a checkpoint does not know whether its run was compiled. Only
:class:`resflows.layers.iresblock._LinearizedNeumannLogDet` (Neumann gradients, ``--mem-eff``, a branch
with a hand-written linearisation) runs these; every other estimator needs a double backward
(``create_graph=True``), which AOT autograd does not support, and stays eager.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import linearize

Tensor = torch.Tensor

__all__ = ["CompiledPasses", "CompileUnavailable", "check_compile_available", "enable", "compile_report",
           "eager_reason", "compiled_graph_count"]

# Distinct block shapes a model may have per compiled function before torch gives up recompiling (its
# default, 8, counts shapes here, not blocks, but six scales and the fully connected end come close).
RECOMPILE_LIMIT = 64


class CompileUnavailable(RuntimeError):
    """``--compile True`` cannot work here (no C++ compiler, no Triton, an unsupported device or Python)."""


def check_compile_available(device: torch.device) -> None:
    """Raise :class:`CompileUnavailable` saying why compiling cannot work on ``device``."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise CompileUnavailable("torch.compile does not support this Python version")
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx[1] if isinstance(inductor_config.cpp.cxx, tuple) else inductor_config.cpp.cxx
        cxx = os.environ.get("CXX", cxx or "g++")
        if shutil.which(cxx) is None:
            raise CompileUnavailable(f"inductor's CPU back end needs a C++ compiler and {cxx!r} is not on PATH "
                                     f"(install g++ or set CXX)")
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileUnavailable(f"inductor needs Triton for {device}, and Triton is missing or does not support "
                                     f"this GPU")
    else:
        raise CompileUnavailable(f"compiling is supported on cpu and cuda, not {device.type}")


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compiled_graph_count() -> int:
    """Graphs torch has compiled in this process (dynamo's counter)."""
    return _graphs()


def _standard_layout(a: Tensor) -> Tensor:
    """``a`` contiguous, with the standard strides also in its size-1 dimensions (where any stride describes the
    same memory, but a graph's guards still compare them): a view, no copy, unless ``a`` was not contiguous."""
    a = a.contiguous()
    strides, step = [], 1
    for n in reversed(a.shape):
        strides.append(step)
        step *= n
    strides = tuple(reversed(strides))
    return a if a.stride() == strides else a.as_strided(a.shape, strides)


class _Timed:
    """A compiled function that adds the time of the calls which compiled a new graph to ``CompiledPasses``."""

    def __init__(self, fn: Callable, owner: "CompiledPasses"):
        self.fn, self.owner = fn, owner

    def __call__(self, *args):
        args = [_standard_layout(a) if isinstance(a, Tensor) else a for a in args]
        before = _graphs()
        t0 = time.perf_counter()
        out = self.fn(*args)
        new = _graphs() - before
        if new:
            self.owner.graphs += new
            self.owner.seconds += time.perf_counter() - t0
        return out


# Graphs are specialised on their inputs' strides: every tensor goes in and comes out in the standard
# (contiguous) layout, or the series' first product (the probe) and the next ones (a convolution's output,
# channels-last on CPU) would each compile their own graph.
def _primal(nnet: nn.Module, x: Tensor):
    g, tape = linearize.primal(nnet, x)
    return g.contiguous(), tape


def _tape_vjp(tape: linearize.Tape, w: Tensor) -> Tensor:
    return linearize.tape_vjp(tape, w).contiguous()


def _dual(nnet: nn.Module, x: Tensor, t: Tensor, tape: linearize.Tape) -> Tuple[Tensor, Tensor]:
    g, jt = linearize.dual(nnet, x, t, tape)
    return g.contiguous(), jt.contiguous()


class CompiledPasses:
    """The compiled ``primal`` / ``tape_vjp`` / ``dual`` (same signatures as :mod:`resflows.layers.linearize`),
    shared by every block of a model. ``graphs`` and ``seconds`` count what compiling has cost so far."""

    def __init__(self):
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.graphs, self.seconds = 0, 0.0
        # dynamic=False: a training run has one batch shape (the last incomplete batch is dropped).
        self.primal = _Timed(torch.compile(_primal, dynamic=False), self)
        self.tape_vjp = _Timed(torch.compile(_tape_vjp, dynamic=False), self)
        self.dual = _Timed(torch.compile(_dual, dynamic=False), self)
        self.strip_tape = linearize.strip_tape

    def __deepcopy__(self, memo):  # an EMA copy of the model shares the compiled functions
        return self


def eager_reason(block: nn.Module) -> Optional[str]:
    """Why this residual block's training step stays eager under ``--compile`` (None: it is compiled)."""
    from .monotone import MonotoneBlock
    from .vardeq import ConditionedBranch

    if isinstance(block, MonotoneBlock):  # its solves and log-det run their own (eager) passes
        return "monotone blocks (--monotone_resolvent, --var-deq-mf) are not compiled yet"
    if isinstance(block.nnet, ConditionedBranch):  # reads its condition from an attribute set per pass
        return "the variational dequantiser's blocks are not compiled yet"
    if block.exact_trace or block.brute_force:
        return "exact log-determinants"
    if not block.neumann_grad:
        return "naive gradients (--neumann-grad False) differentiate the whole series: double backward"
    if not block.grad_in_forward:
        return "--mem-eff False differentiates a vector-Jacobian product: double backward"
    if not block.linearizable:
        return "a branch without a hand-written linearisation goes through autograd's double backward"
    return None


def enable(model: nn.Module) -> Tuple[CompiledPasses, List[nn.Module], Dict[str, int]]:
    """Compile the training passes of every block of ``model`` that can be compiled. Returns the shared
    passes, the compiled blocks and, for the others, how many stay eager for each reason."""
    from .iresblock import iResBlock

    passes = CompiledPasses()
    compiled, eager = [], {}
    for m in model.modules():
        if isinstance(m, iResBlock):
            reason = eager_reason(m)
            if reason is None:
                m.compiled_passes = passes
                compiled.append(m)
            else:
                eager[reason] = eager.get(reason, 0) + 1
    return passes, compiled, eager


def compile_report(passes: CompiledPasses) -> str:
    return f"compiled {passes.graphs} graphs in {passes.seconds:.1f} s"
