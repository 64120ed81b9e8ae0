"""The private torch calls resflows makes fail loudly here when torch renames, drops or changes them, rather
than quietly elsewhere:

* ``torch._C._will_engine_execute_node`` (``resflows/layers/activations.py``): inside LipSwish's backward,
  whether the current ``autograd.grad`` call needs the slope parameter's gradient (without it: always computed,
  slower, same results);
* ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` (``resflows/trainer.py``): learned
  norm orders left out of DDP's gradient buckets under torchrun (without it: ``--learn-p`` cannot be wrapped).
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from resflows.layers import LipSwish


def test_will_engine_execute_node_answers_inside_lipswish_backward(monkeypatch):
    real = getattr(torch._C, "_will_engine_execute_node", None)
    assert callable(real), "torch._C._will_engine_execute_node is gone: update _will_run in resflows/layers/activations.py"
    answers = []

    def spy(node):
        answers.append(bool(real(node)))
        return real(node)

    monkeypatch.setattr(torch._C, "_will_engine_execute_node", spy)
    act = LipSwish().double()
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.grad(act(x).sum(), x)  # d/dx only: the slope softplus(beta) needs no gradient
    torch.autograd.grad(act(x).sum(), [x, act.beta])  # both
    assert answers == [False, True]


def test_ddp_leaves_out_the_parameters_named_for_it():
    name = "_set_params_and_buffers_to_ignore_for_model"
    assert callable(getattr(nn.parallel.DistributedDataParallel, name, None)), (
        f"DistributedDataParallel.{name} is gone: update Trainer._wrap in resflows/trainer.py")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        module = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
        getattr(nn.parallel.DistributedDataParallel, name)(module, ["1.weight"])
        ddp = nn.parallel.DistributedDataParallel(module)
        assert set(ddp.parameters_to_ignore) == {"1.weight"}
        synced = {id(p) for p in ddp._module_parameters}
        assert id(module[1].weight) not in synced and id(module[0].weight) in synced
    finally:
        if owned:
            dist.destroy_process_group()
