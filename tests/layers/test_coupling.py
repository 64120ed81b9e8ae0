"""Affine coupling blocks, including odd channel counts (rejected by the paper's code)."""
import pytest
import torch
import torch.nn as nn

from resflows.layers import ChannelCouplingBlock, CouplingBlock, MaskedCouplingBlock
from resflows.layers.coupling import checkerboard_mask, coupling_split
from tests.flowcheck import check_flow_layer

D64 = torch.float64


def _conv_net(c_in, c_out):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(c_in, 8, 3, 1, 1), nn.ELU(), nn.Conv2d(8, c_out, 3, 1, 1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)  # far from identity, so the test can fail
    return net


@pytest.mark.parametrize("channels", [4, 3, 5])
@pytest.mark.parametrize("mask", ["channel0", "channel1"])
def test_channel_coupling(channels, mask):
    na, nb = coupling_split(channels, mask == "channel1")
    block = ChannelCouplingBlock(channels, _conv_net(na, 2 * nb), mask_type=mask)
    x = torch.randn(2, channels, 3, 3, dtype=D64)
    y, _ = check_flow_layer(block, x)
    # The conditioning half passes through unchanged.
    keep = slice(channels // 2, None) if mask == "channel1" else slice(0, channels // 2)
    assert torch.equal(y[:, keep], x[:, keep])


@pytest.mark.parametrize("channels", [2, 3])
@pytest.mark.parametrize("mask", ["checkerboard0", "checkerboard1"])
def test_checkerboard_coupling(channels, mask):
    block = MaskedCouplingBlock(channels, _conv_net(channels, 2 * channels), mask_type=mask)
    x = torch.randn(2, channels, 3, 4, dtype=D64)
    y, _ = check_flow_layer(block, x)
    m = checkerboard_mask(x, swap=mask == "checkerboard1").bool().expand_as(x)
    assert torch.equal(y[m], x[m]) and not torch.allclose(y[~m], x[~m])


def test_checkerboard_mask_pattern():
    m = checkerboard_mask(torch.zeros(1, 1, 2, 3))
    assert m[0, 0].tolist() == [[1, 0, 1], [0, 1, 0]]


@pytest.mark.parametrize("dim,swap", [(4, False), (5, True), (5, False)])
def test_fc_coupling(dim, swap):
    na, nb = coupling_split(dim, swap)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(na, 16), nn.Tanh(), nn.Linear(16, 2 * nb)).double()
    block = CouplingBlock(dim, net, swap=swap)
    check_flow_layer(block, torch.randn(3, dim, dtype=D64))
