"""Anderson-accelerated inverse of a residual block: same answer as the paper's fixed-point iteration (same
stopping rule), fewer evaluations of the branch on a strongly contractive block."""
import pytest
import torch
import torch.nn as nn

from resflows.layers import InverseNotConvergedWarning, iResBlock
from resflows.layers.activations import LipSwish

D64 = torch.float64


def _block(lip: float, d: int = 6) -> iResBlock:
    """y = x + g(x) with Lip(g) <= lip and Jacobian near -lip I: the plain iteration oscillates slowly."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=D64))
    lin1, lin2 = nn.Linear(d, d).double(), nn.Linear(d, d).double()
    with torch.no_grad():
        lin1.weight.copy_(q)
        lin2.weight.copy_(-lip * q.T)
    return iResBlock(nn.Sequential(lin1, LipSwish().double(), lin2)).eval()


@pytest.mark.parametrize("lip", [0.5, 0.9, 0.97])
def test_anderson_matches_fixed_point_with_fewer_evaluations(lip):
    block = _block(lip)
    x = torch.randn(16, 6, dtype=D64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = block.transform(x)
    block.inverse_max_iters = 5000
    x_fp = block.invert(y)
    evals_fp = block.last_inverse_iters
    block.inverse_method = "anderson"
    x_aa = block.invert(y)
    evals_aa = block.last_inverse_iters
    # Both stop at the same rule (steps below sqrt(1e-5 + 1e-5 |y|) per element); the error is within
    # what that rule allows at the contraction rate.
    bound = (1e-5 + 1e-5 * y.abs().max()) ** 0.5 * lip / (1 - lip)
    assert float((x_fp - x).abs().max()) < bound
    assert float((x_aa - x).abs().max()) < bound
    assert evals_aa <= evals_fp
    if lip >= 0.9:
        assert evals_aa < evals_fp / 3, (evals_aa, evals_fp)


def test_anderson_warns_when_it_hits_the_cap():
    block = _block(0.97)
    block.inverse_method, block.inverse_max_iters = "anderson", 3
    y = torch.randn(4, 6, dtype=D64)
    with pytest.warns(InverseNotConvergedWarning):
        block.invert(y)
    assert block.last_inverse_iters == 3


def test_anderson_inverse_in_float32_round_trips():
    block = _block(0.9).float()
    block.inverse_method = "anderson"
    x = torch.randn(32, 6)
    with torch.no_grad():
        x_rec = block.invert(block.transform(x))
    assert float((x_rec - x).abs().max()) < 1e-2


def test_model_and_command_line_select_the_inverse():
    from resflows.cli import parse_args
    from resflows.config import TrainConfig
    from resflows.factory import model_config_from
    from resflows.model import ResidualFlow

    cfg, _ = parse_args(["--data", "digits", "--nblocks", "2-2", "--inverse", "anderson"])
    assert cfg.inverse == "anderson"
    assert parse_args(["--data", "digits", "--nblocks", "2-2"])[0].inverse == "fixed-point"  # the paper's iteration stays the default
    torch.manual_seed(0)
    model = ResidualFlow(model_config_from(TrainConfig(data="digits", nblocks="1-1", idim=8, fc_idim=16))).double()
    x = torch.rand(4, 1, 8, 8, dtype=D64)
    with torch.no_grad():
        model.train()
        model.transform(x)
        model.eval()
        z = model.transform(x)
        x_fp = model.inverse(z)
        model.set_inverse_method("anderson")
        assert all(b.inverse_method == "anderson" for b in model.iresblocks())
        x_aa = model.inverse(z)
    assert float((x_aa - x_fp).abs().max()) < 1e-3 and float((x_aa - x).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="anderson"):
        model.set_inverse_method("newton")
