"""A default training step reads nothing back from the device but its logging numbers.

On a GPU every ``.item()``, ``float(t)``, ``bool(t)``, ``.cpu()`` or ``.tolist()`` of a device tensor waits for
the device to finish its queue. The step below runs on the CPU, where nothing waits, so the test counts the
calls themselves: a ``TorchDispatchMode`` sees every scalar read (``aten._local_scalar_dense``, behind
``item``, ``float``, ``bool`` and ``int``), in the backward pass too, and a ``TorchFunctionMode`` sees
``.cpu()``, ``.numpy()`` and ``.tolist()``. Each call is attributed to the innermost resflows (or torch.optim)
function that made it, and only the ones listed here may occur.
"""
import collections
import math
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from resflows import ResidualFlow
from resflows.config import TrainConfig
from resflows.distributed import DistInfo
from resflows.factory import model_config_from
from resflows.loaders import tensor_data
from resflows.trainer import Trainer

PACKAGE = os.path.dirname(os.path.abspath(__import__("resflows").__file__))
TORCH_OPTIM = os.path.join(os.path.dirname(torch.__file__), "optim")

# (file, function) -> how many reads one step may make there, and why.
FORWARD_BACKWARD = {
    ("trainer.py", "forward_backward"): 1,  # the logged loss, bits/dim, log p(z), -delta log p: one copy
}
OPTIMIZE = {
    ("trainer.py", "optimize"): 2,  # the skip/stop decision (one read of both flags) and the logged grad norm
    ("power.py", "update_lipschitz"): None,  # the power iterations' convergence check (every iteration on CPU only)
    ("torch.optim", None): None,  # torch's optimiser reads its own host step counters
}


def _caller() -> tuple:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(PACKAGE):
            return os.path.basename(frame.filename), frame.name
        if frame.filename.startswith(TORCH_OPTIM):
            return "torch.optim", None
    return "elsewhere", None


class _Reads(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls[_caller()] += 1
        return func(*args, **(kwargs or {}))


class _Copies(TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist):
            where = _caller()
            if where != ("iresblock.py", "_draw"):  # the draws of N are made on the host, by design
                self.calls[where] += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> collections.Counter:
    calls = collections.Counter()
    with _Copies(calls), _Reads(calls):
        fn()
    return calls


def _allowed(calls, allowed) -> list:
    bad = []
    for where, n in calls.items():
        key = where if where in allowed else (where[0], None)
        limit = allowed.get(key, 0)
        if limit is not None and n > limit:
            bad.append((where, n))
    return bad


def test_default_training_step_makes_no_host_reads_but_logging(tmp_path):
    # The reference model (--data mnist --imagesize 28 --nblocks 2-2-2 --idim 64), default flags, batch 2.
    torch.manual_seed(0)
    cfg = TrainConfig(data="mnist", imagesize=28, nblocks="2-2-2", idim=64, batchsize=2, seed=0)
    model = ResidualFlow(model_config_from(cfg))
    x, y = torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    trainer = Trainer(cfg, DistInfo(device=torch.device("cpu")), model, str(tmp_path), data=tensor_data(x, y, 2))
    blocks = [m for m in model.modules() if type(m).__name__ == "iResBlock"]
    assert blocks and all(b.grad_in_forward and b.neumann_grad and b.linearizable for b in blocks)  # the default path
    # A first step: host copies of the ActNorm flags and truncation parameters are read once, here.
    trainer.forward_backward(x, y, sync=True, n_accum=1)
    trainer.optimize(1)

    calls = _count(lambda: trainer.forward_backward(x, y, sync=True, n_accum=1))
    assert calls == collections.Counter(FORWARD_BACKWARD), dict(calls)
    calls = _count(lambda: trainer.optimize(1))
    assert not _allowed(calls, OPTIMIZE), dict(calls)
    assert calls[("trainer.py", "optimize")] == 2, dict(calls)


def test_the_counter_sees_reads_in_the_backward_pass():
    """The check above would pass vacuously if the modes missed the backward pass: a read inside a custom
    backward (where LipSwish's slope used to be read) is seen."""

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * float(g.sum())

    x = torch.ones(3, requires_grad=True)
    calls = _count(lambda: ReadsInBackward.apply(x).sum().backward())
    assert sum(calls.values()) == 1


def test_host_copies_follow_the_tensor():
    """The ActNorm flag and the truncation parameter are re-read after any change of the tensor."""
    from resflows.layers import ActNorm2d, iResBlock

    act = ActNorm2d(2)
    assert not act.is_initialized()
    act(torch.randn(3, 2, 4, 4))
    assert act.is_initialized()
    act.load_state_dict({**act.state_dict(), "initialized": torch.tensor(0)})
    assert not act.is_initialized()
    block = iResBlock(torch.nn.Linear(2, 2), geom_p=0.5)
    assert block._geom_p_value() == 0.5
    block.load_state_dict({**block.state_dict(), "geom_p": torch.tensor(math.log(0.25 / 0.75), dtype=torch.float64)})
    assert abs(block._geom_p_value() - 0.25) < 1e-12
