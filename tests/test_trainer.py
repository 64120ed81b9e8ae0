"""Trainer pieces: LR schedule, optimisers with weight decay, EMA, losses."""
import math

import pytest
import torch

from resflows import ModelConfig, ResidualFlow, TrainConfig, bits_per_dim
from resflows.losses import padding_logprob
from resflows.optim import EMA, LRSchedule, make_optimizer


def test_warmup_then_the_scheduler_applies():
    s = LRSchedule(TrainConfig(lr=1.0, warmup_iters=10, scheduler=True, optimizer="adam"))
    assert s.lr(0, 0.0) == pytest.approx(0.1) and s.lr(9, 0.0) == pytest.approx(1.0)
    assert s.lr(1000, 10.0) == pytest.approx(0.5)  # half-way through the first 20-epoch cosine cycle
    assert s.lr(1000, 20.0) == pytest.approx(1.0)  # warm restart
    assert s.lr(1000, 40.0) == pytest.approx(0.5)  # second cycle is 40 epochs long
    sgd = LRSchedule(TrainConfig(lr=1.0, warmup_iters=0, scheduler=True, optimizer="sgd"))
    assert [sgd.lr(5000, e) for e in (59, 60, 120, 160)] == pytest.approx([1.0, 0.2, 0.04, 0.008])
    flat = LRSchedule(TrainConfig(lr=1.0, warmup_iters=0, scheduler=False))
    assert flat.lr(10**6, 500.0) == 1.0


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.AdamW), ("adamax", torch.optim.Adamax),
                                      ("rmsprop", torch.optim.RMSprop), ("sgd", torch.optim.SGD)])
def test_weight_decay_works(name, cls):
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer(TrainConfig(optimizer=name, lr=0.1, wd=0.5), [p])
    assert isinstance(opt, cls)
    p.grad = torch.zeros(3)  # no loss gradient: any change comes from weight decay
    opt.step()
    assert torch.all(p < 1)


def test_ema_is_a_model_copy_with_its_own_power_iterations():
    torch.manual_seed(0)
    model = ResidualFlow(ModelConfig(input_size=(1, 8, 8), nblocks=(1, 1), idim=8, fc_nblocks=1, fc_idim=8))
    ema = EMA(model, decay=0.9)
    u_before = ema.model.transforms[0].chain[2].nnet[0].u.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.transforms[0].chain[2].nnet[0].u.mul_(-1)
    ema.update(model)
    for (n, e), p in zip(ema.model.named_parameters(), model.parameters()):
        assert torch.allclose(e, p - 0.9, atol=1e-6), n  # 0.9 * old + 0.1 * (old + 1)
    assert torch.equal(ema.model.transforms[0].chain[2].nnet[0].u, u_before)


def test_bits_per_dim_terms():
    z = torch.zeros(2, 12)
    logdet = torch.tensor([0.0, 3.0])
    bpd = bits_per_dim(z, logdet, (3, 2, 2), nvals=256)
    logpz = -0.5 * math.log(2 * math.pi) * 12
    expected = -(logpz + logdet - 12 * math.log(256)) / (12 * math.log(2))
    assert torch.allclose(bpd, expected)
    # Padding: D counts the padded channels, the normaliser does not; log p(u) is subtracted.
    z = torch.zeros(1, 16)
    logpu = torch.tensor([2.0])
    bpd = bits_per_dim(z, torch.zeros(1), (3, 2, 2), 256, padding=1, logpu=logpu)
    expected = -(-0.5 * math.log(2 * math.pi) * 16 - 16 * math.log(256) - 2.0) / (12 * math.log(2))
    assert bpd.item() == pytest.approx(expected)


def test_padding_logprob():
    x = torch.rand(2, 4, 3, 3)
    assert torch.equal(padding_logprob(x, 3, 256, "uniform"), torch.zeros(2))
    u = x[:, 3:] * 256
    lp = torch.distributions.Normal(128.0, 32.0).log_prob(u).reshape(2, -1).sum(1)
    assert torch.allclose(padding_logprob(x, 3, 256, "gaussian"), lp)
