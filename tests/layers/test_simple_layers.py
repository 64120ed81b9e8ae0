"""ActNorm, squeeze, logit, normalize, invertible 1x1, moving batch norm, the sequential container."""
import math

import pytest
import torch

from resflows.layers import (
    ActNorm1d,
    ActNorm2d,
    InvertibleConv2d,
    InvertibleLinear,
    LogitTransform,
    MovingBatchNorm1d,
    MovingBatchNorm2d,
    Normalize,
    SequentialFlow,
    SqueezeLayer,
)
from resflows.layers.jacobian import per_example_jacobian
from resflows.layers.squeeze import squeeze
from tests.flowcheck import check_flow_layer

D64 = torch.float64


def test_actnorm2d_data_dependent_init_and_exact_logdet():
    x = torch.randn(16, 3, 4, 4, dtype=D64) * torch.tensor([1.0, 3.0, 0.1], dtype=D64).view(1, 3, 1, 1) + 2.0
    layer = ActNorm2d(3).double()
    assert int(layer.initialized) == 0
    y, _ = layer(x)
    assert int(layer.initialized) == 1
    # Channels with variance above 0.2 come out standardised (unbiased variance, as the paper).
    flat = y.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(3, dtype=D64), atol=1e-10)
    assert torch.allclose(flat[:2].var(1), torch.ones(2, dtype=D64), atol=1e-10)
    # The tiny-variance channel is scaled by 1/sqrt(0.2) only (variance floor).
    assert torch.allclose(layer.weight[2], torch.tensor(-0.5 * math.log(0.2), dtype=D64))
    check_flow_layer(layer, x[:3])


def test_actnorm1d():
    layer = ActNorm1d(5).double()
    x = torch.randn(8, 5, dtype=D64) * 4
    layer(x)
    check_flow_layer(layer, x[:4])


def test_actnorm_inverse_before_init_is_an_error():
    with pytest.raises(RuntimeError, match="not initialised"):
        ActNorm2d(2).inverse(torch.zeros(1, 2, 2, 2))


def test_squeeze_order_and_inverse():
    x = torch.arange(2 * 4 * 4, dtype=D64).view(1, 2, 4, 4)
    y = squeeze(x)
    # channel c*4 + dy*2 + dx holds x[c, 2i+dy, 2j+dx]  (order (c, dy, dx))
    for c in range(2):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(y[0, c * 4 + dy * 2 + dx], x[0, c, dy::2, dx::2])
    check_flow_layer(SqueezeLayer(2), torch.randn(2, 2, 4, 4, dtype=D64))


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="divisible"):
        SqueezeLayer(2)(torch.zeros(1, 1, 3, 4))


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_transform(alpha):
    x = torch.rand(3, 1, 3, 3, dtype=D64) * 0.98 + 0.01
    check_flow_layer(LogitTransform(alpha), x)


def test_normalize():
    x = torch.rand(2, 4, 3, 3, dtype=D64)  # 3 normalised channels + 1 untouched (padding)
    layer = Normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    y, _ = check_flow_layer(layer, x)
    assert torch.equal(y[:, 3], x[:, 3])


def test_invertible_linear_and_conv():
    torch.manual_seed(0)
    lin = InvertibleLinear(4).double()
    with torch.no_grad():
        lin.weight.add_(0.3 * torch.randn(4, 4, dtype=D64))
    check_flow_layer(lin, torch.randn(3, 4, dtype=D64))
    conv = InvertibleConv2d(3).double()
    with torch.no_grad():
        conv.weight.add_(0.3 * torch.randn(3, 3, dtype=D64))
    check_flow_layer(conv, torch.randn(2, 3, 3, 3, dtype=D64))


def test_invertible_layers_start_as_permutations():
    w = InvertibleConv2d(5).weight
    assert torch.equal(w.sum(0), torch.ones(5)) and torch.equal(w.sum(1), torch.ones(5))


def test_sequential_flow_sums_logdets():
    torch.manual_seed(0)
    flow = SequentialFlow([LogitTransform(0.05), ActNorm2d(2), SqueezeLayer(2), ActNorm2d(8)]).double()
    x = torch.rand(6, 2, 4, 4, dtype=D64)
    flow(x)  # initialise the ActNorms
    y, ld = check_flow_layer(flow, x[:2])
    total = sum(layer(t)[1] for layer, t in _intermediates(flow, x[:2]))
    assert torch.allclose(ld, total)


def _intermediates(flow, x):
    for layer in flow.chain:
        yield layer, x
        x = layer(x)[0]


@pytest.mark.parametrize("cls,shape", [(MovingBatchNorm1d, (8, 3)), (MovingBatchNorm2d, (8, 3, 2, 2))])
def test_moving_batchnorm_running_mean_shift(cls, shape):
    bn = cls(3).double()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(*shape, dtype=D64) + 3
    y = bn(x)  # training: subtracts the running mean (zeros) before updating it
    assert torch.allclose(y, x + bn.bias.view(*bn.shape))
    batch_mean = x.transpose(0, 1).reshape(3, -1).mean(1)
    assert torch.allclose(bn.running_mean, 0.1 * batch_mean)
    assert float(bn.step) == 1
    bn.eval()
    y = bn(x)
    assert torch.allclose(bn.invert(y), x)  # a branch module: the inverse map alone, no log-det
    # A shift: the Jacobian is the identity (1-Lipschitz, log-det 0).
    jac = per_example_jacobian(bn, x[:1])[0]
    assert torch.allclose(jac, torch.eye(x[0].numel(), dtype=D64))
