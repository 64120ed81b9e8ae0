"""The flow-layer checks, driven from one table of cases (``CASES``: one per flow layer in resflows, and a
layer without a case fails ``test_every_flow_layer_has_a_case``), with non-initial parameters in float64:

* the contract: ``forward(x) -> (y, log|det dy/dx|[B])``, ``inverse(y) -> (x, log|det dx/dy|[B])`` round trips,
  the two log-dets cancel and equal ``slogdet`` of the autograd Jacobian (residual blocks with exact log-dets);
* ``transform(x)`` (the log-det-free path used by sampling and the classifier) equals ``forward(x)[0]``, in
  training and evaluation mode."""
import copy
import functools

import pytest
import torch
import torch.nn as nn

import resflows.toy.model  # noqa: F401 - registers ToyFlow as a FlowLayer subclass
from resflows import ModelConfig, ResidualFlow
from resflows.layers import (
    ActNorm1d,
    ActNorm2d,
    ChannelCouplingBlock,
    CouplingBlock,
    InvertibleConv2d,
    InvertibleLinear,
    LipSwish,
    LogitTransform,
    MaskedCouplingBlock,
    MovingBatchNorm2d,
    Normalize,
    SequentialFlow,
    SqueezeLayer,
    get_conv2d,
    get_linear,
    iResBlock,
)
from resflows.layers.base import FlowLayer
from resflows.layers.fc import FCWrapper
from resflows.layers.jacobian import jacobian_logdet
from resflows.layers.lipschitz import lipschitz_layers, update_lipschitz
from resflows.layers.monotone import MonotoneBlock
from resflows.layers.normalization import MovingBatchNormNd
from resflows.toy.model import MovingBatchNormFlow1d, ToyFlow
from tests.flowcheck import check_flow_layer

D64 = torch.float64


def _perturbed(layer: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=D64))
        for m in layer.modules():
            if hasattr(m, "initialized"):
                m.initialized.fill_(1)  # ActNorm: use the perturbed parameters, no data-dependent init
            if isinstance(m, MovingBatchNormNd):
                m.running_mean.normal_(generator=g)
    return layer


def _resblock(fc: bool):
    if fc:
        return iResBlock(nn.Sequential(get_linear(4, 8, coeff=0.9), LipSwish(), get_linear(8, 4, coeff=0.9)))
    return iResBlock(nn.Sequential(MovingBatchNorm2d(2), LipSwish(), get_conv2d(2, 4, 3, 1, 1, coeff=0.9, spatial_dims=(4, 4)),
                                   nn.ELU(), get_conv2d(4, 2, 3, 1, 1, coeff=0.9, spatial_dims=(4, 4))))


def _conv_net(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, c_out, 3, 1, 1))


X_IMG = (3, 2, 4, 4)
CASES = {
    ActNorm1d: lambda: (ActNorm1d(4), (3, 4)),
    ActNorm2d: lambda: (ActNorm2d(2), X_IMG),
    InvertibleLinear: lambda: (InvertibleLinear(4), (3, 4)),
    InvertibleConv2d: lambda: (InvertibleConv2d(2), X_IMG),
    LogitTransform: lambda: (LogitTransform(0.05), X_IMG),
    Normalize: lambda: (Normalize((0.4, 0.5), (0.2, 0.3)), X_IMG),
    SqueezeLayer: lambda: (SqueezeLayer(2), X_IMG),
    iResBlock: lambda: (_resblock(fc=False), X_IMG),
    # (a deterministic branch: the solves evaluate it many times)
    MonotoneBlock: lambda: (MonotoneBlock(nn.Sequential(get_linear(4, 8, coeff=0.9), LipSwish(), get_linear(8, 4, coeff=0.9))),
                            (3, 4)),
    CouplingBlock: lambda: (CouplingBlock(4, nn.Sequential(nn.Linear(2, 8), nn.ELU(), nn.Linear(8, 4))), (3, 4)),
    ChannelCouplingBlock: lambda: (ChannelCouplingBlock(2, _conv_net(1, 2)), X_IMG),
    MaskedCouplingBlock: lambda: (MaskedCouplingBlock(2, _conv_net(2, 4)), X_IMG),
    FCWrapper: lambda: (FCWrapper(_resblock(fc=True)), (3, 1, 2, 2)),
    SequentialFlow: lambda: (SequentialFlow([ActNorm2d(2), _resblock(fc=False), InvertibleConv2d(2), SqueezeLayer(2)]), X_IMG),
    ToyFlow: lambda: (ToyFlow([_resblock(fc=True), ActNorm1d(4)]), (3, 4)),
    MovingBatchNormFlow1d: lambda: (MovingBatchNormFlow1d(4), (3, 4)),
}
@functools.lru_cache(maxsize=None)
def _case(cls):
    return CASES[cls]()  # normalised layers run power iterations when built: build once


def _built(cls):
    layer, shape = _case(cls)
    return copy.deepcopy(layer), shape


# FlowLayer subclasses that are not flow layers on their own.
NOT_FLOWS = {"_HeadActNorm": "a classification head's ActNorm (returns the tensor only)", "ActNormNd": "abstract base"}


def _all_subclasses(cls):
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_every_flow_layer_has_a_case():
    missing = {c for c in _all_subclasses(FlowLayer) if c.__name__ not in NOT_FLOWS and c.__module__.startswith("resflows")}
    assert missing <= set(CASES), f"add to CASES: {sorted(c.__name__ for c in missing - set(CASES))}"


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_flow_layer_contract(cls):
    """Round trip, cancelling log-dets, and log-dets equal to slogdet of the Jacobian, in evaluation mode
    (residual blocks with their exact log-det, so that the comparison is exact)."""
    layer, shape = _built(cls)
    layer = _perturbed(layer).eval()
    # The perturbed weights need their operator norms re-estimated, or a block may not be contractive.
    update_lipschitz(lipschitz_layers(layer), n_iterations=10)
    for m in layer.modules():
        if isinstance(m, iResBlock):
            m.brute_force = True
            m.inverse_atol, m.inverse_rtol = 1e-22, 0.0  # squared steps below 1e-22: x to ~1e-10
        if isinstance(m, MonotoneBlock):  # the Jacobian below differentiates its solve: adjoints to round-off
            m.adjoint_atol = m.adjoint_rtol = 1e-14
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=D64) * 0.8 + 0.1
    with torch.no_grad():  # brute-force log-dets without a graph
        _, logdet = check_flow_layer(layer, x, rtol=1e-8, inv_atol=1e-9, check_jacobian=False)
    _, exact = jacobian_logdet(layer.transform, x)  # transform: no second Jacobian inside the one taken here
    torch.testing.assert_close(logdet, exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_transform_equals_forward(cls, training):
    layer, shape = _built(cls)
    layer = _perturbed(layer).train(training)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=D64) * 0.8 + 0.1
    # Copies: a batch-norm running mean moves with every training forward.
    y_forward, _ = copy.deepcopy(layer)(x)
    y_transform = copy.deepcopy(layer).transform(x)
    torch.testing.assert_close(y_transform, y_forward, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(batchnorm=True, quadratic=True, fc_actnorm=True),
                                dict(factor_out=True, fc_end=False, block="coupling")])
def test_model_transform_equals_forward(kw):
    torch.manual_seed(0)
    model = ResidualFlow(ModelConfig(input_size=(1, 8, 8), nblocks=(1, 1), idim=8, fc_idim=8, fc_nblocks=1, **kw))
    model = _perturbed(model).train()
    x = torch.rand(3, 1, 8, 8, dtype=D64) * 0.8 + 0.1
    torch.testing.assert_close(copy.deepcopy(model).transform(x), copy.deepcopy(model)(x)[0], rtol=1e-12, atol=1e-12)
