"""The maintenance methods shared by ResidualFlow and ToyFlow (resflows/layers/upkeep.py)."""
import pytest
import torch
import torch.nn as nn

from resflows.layers import (
    POWER_ITERATION_BUFFERS,
    FlowUpkeep,
    InducedNormLinear,
    LopLinear,
    SequentialFlow,
    iResBlock,
    power_buffers,
)


class TinyFlow(FlowUpkeep, SequentialFlow):
    def lipschitz_defaults(self):
        return dict(n_iterations=None, atol=1e-8, rtol=1e-8)


def tiny_flow():
    torch.manual_seed(0)
    net = nn.Sequential(InducedNormLinear(2, 8, coeff=0.9), nn.ELU(), LopLinear(8, 2, coeff=0.9, domain=1, codomain=2))
    return TinyFlow([iResBlock(net.double())])


def test_upkeep_methods():
    flow = tiny_flow()
    with torch.no_grad():
        flow[0].nnet[0].weight.mul_(10)
    assert flow.update_lipschitz() > 1  # the defaults: iterate to tolerance
    assert flow.update_lipschitz(n_iterations=3) == 3
    lips = flow.lipschitz_constants()
    assert list(lips) == ["chain.0.nnet.0", "chain.0.nnet.2"] and all(v <= 0.9 for v in lips.values())
    assert flow.norm_orders() == {"chain.0.nnet.0": (2.0, 2.0), "chain.0.nnet.2": (1.0, 2.0)}
    assert flow.iresblocks() == [flow[0]]
    flow.set_inverse_method("anderson")
    assert flow[0].inverse_method == "anderson"
    with pytest.raises(ValueError, match="inverse method"):
        flow.set_inverse_method("newton")
    assert flow.concatenation_weights() == {}


def test_power_buffers_are_the_power_method_state():
    flow = tiny_flow()
    names = [n for n, _ in power_buffers(flow)]
    assert POWER_ITERATION_BUFFERS == ("u", "v", "scale")
    assert names == ["chain.0.nnet.0.u", "chain.0.nnet.0.v", "chain.0.nnet.0.scale", "chain.0.nnet.2.scale"]
    buffers = dict(flow.named_buffers())
    assert all(b is buffers[n] for n, b in power_buffers(flow))


def test_both_models_use_the_shared_upkeep():
    from resflows.model import ResidualFlow
    from resflows.toy.model import ToyFlow

    for cls in (ResidualFlow, ToyFlow):
        assert issubclass(cls, FlowUpkeep)
        for name in ("update_lipschitz", "lipschitz_constants", "norm_orders", "iresblocks", "set_inverse_method"):
            assert getattr(cls, name) is getattr(FlowUpkeep, name), (cls, name)
