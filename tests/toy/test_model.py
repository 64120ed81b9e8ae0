"""Toy models: exact 2-D log-dets against autograd Jacobians (float64), inverses, norm orders, config checks."""
import math

import pytest
import torch

from resflows.config import ConfigError
from resflows.exact import jacobian_logdet
from resflows.layers import InducedNormLinear, LopLinear, MovingBatchNorm1d, iResBlock
from resflows.layers.lipschitz import norm_order_gradients
from resflows.toy import ToyConfig, build_toy_model
from resflows.toy.data import data_rng, sample_tensor

SMALL = dict(nblocks=3, dims=(16, 16), data="pinwheel")


def trained_ish(cfg: ToyConfig, steps: int = 3) -> torch.nn.Module:
    """A float64 model moved off its initialisation (ActNorm initialised, running means non-zero,
    weights perturbed so the residual branches are far from zero)."""
    model = build_toy_model(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model.update_lipschitz(n_iterations=None, atol=1e-10, rtol=1e-10)
    model.train()
    for _ in range(steps):  # ActNorm data init and moving-average updates
        model(sample_tensor(cfg.data, 64, data_rng(0, "train"), dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize("extra", [
    {},
    {"actnorm": True, "batchnorm": True},
    {"vnorms": "3f222", "act": "elu"},
    {"learn_p": True},
    {"arch": "realnvp", "actnorm": True},
])
def test_eval_logdet_is_exact(extra):
    model = trained_ish(ToyConfig(**{**SMALL, **extra}))
    x = torch.randn(16, 2, dtype=torch.float64) * 2
    with torch.no_grad():
        z, logdet = model(x)
    z_ref, logdet_ref = jacobian_logdet(model.transform, x)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-10, atol=1e-10)
    assert logdet.abs().max() > 1e-2  # a non-trivial map, not a near-identity


@pytest.mark.parametrize("extra", [{}, {"actnorm": True, "batchnorm": True, "act": "lcube"}, {"arch": "realnvp", "actnorm": True}])
def test_samples_map_back_to_their_latent_codes(extra):
    model = trained_ish(ToyConfig(**{**SMALL, **extra}))
    for block in model.iresblocks():  # |dx|^2 < tol: dx < 1e-10
        block.inverse_atol, block.inverse_rtol, block.inverse_max_iters = 1e-20, 1e-20, 5000
    z = torch.randn(200, 2, dtype=torch.float64)
    with torch.no_grad():
        x = model.invert(z)
        torch.testing.assert_close(model.transform(x), z, rtol=1e-8, atol=1e-8)
        x2, logdet_inv = model.inverse(z)
        _, logdet = model(x2)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-8, atol=1e-8)


def test_residual_net_layout_and_orders():
    cfg = ToyConfig(nblocks=2, dims=(8, 8, 8), vnorms="23f32")
    model = build_toy_model(cfg)
    assert len(model) == 2 and all(isinstance(b, iResBlock) for b in model)
    nnet = model[0].nnet
    linears = [m for m in nnet if isinstance(m, (InducedNormLinear, LopLinear))]
    assert [type(m).__name__ for m in nnet][0::2] == ["LipSwish"] * 4  # act, linear, act, linear, ...
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 8), (8, 8), (8, 8), (8, 2)]
    assert [m.norm_orders() for m in linears] == [(2, 3), (3, math.inf), (math.inf, 3), (3, 2)]
    assert linears[-1].weight.abs().max() < 1e-2  # near-zero last layer: blocks start near the identity
    assert "chain.0.nnet.1.weight" in model.state_dict()  # the paper's toy key names
    assert all(m.coeff == 0.9 for m in linears)
    # A longer --vnorms is cut to the layers there are (the paper zipped it); --mixed False keeps --vnorms.
    assert [m.norm_orders() for m in build_toy_model(ToyConfig(nblocks=1, dims=(8,), vnorms="3f3f3f"))[0].nnet
            if isinstance(m, (InducedNormLinear, LopLinear))] == [(3, math.inf), (math.inf, 3)]
    plain = build_toy_model(ToyConfig(nblocks=1, dims=(8,), vnorms="3f3", mixed=False))
    assert [m.norm_orders() for m in plain[0].nnet if isinstance(m, (InducedNormLinear, LopLinear))] == [(3, math.inf), (math.inf, 3)]


def test_learned_orders_are_cyclic_and_train():
    mixed = build_toy_model(ToyConfig(nblocks=2, dims=(8, 8), learn_p=True))
    lin = [m for m in mixed[0].nnet if isinstance(m, InducedNormLinear)]
    assert [m.codomain is n.domain for m, n in zip(lin, lin[1:] + lin[:1])] == [True] * 3
    assert len({id(m.domain) for m in lin}) == 3
    assert lin[0].domain is not [m for m in mixed[1].nnet if isinstance(m, InducedNormLinear)][0].domain  # per block
    shared = build_toy_model(ToyConfig(nblocks=1, dims=(8, 8), learn_p=True, mixed=False))
    assert len({id(m.domain) for m in shared.modules() if isinstance(m, InducedNormLinear)}) == 1
    mixed.train()
    x = torch.randn(32, 2)
    z, logdet = mixed(x)
    (z.pow(2).sum() - logdet.sum()).backward()
    assert all(m.domain.grad is None for m in lin)  # the orders do not enter the loss (paper)...
    norm_order_gradients(mixed)  # ...they have their own objective
    assert all(m.domain.grad is not None and torch.isfinite(m.domain.grad) for m in lin)


def test_batchnorm_and_actnorm_placement():
    model = build_toy_model(ToyConfig(nblocks=2, dims=(8,), actnorm=True, batchnorm=True))
    # The paper's toy: MovingBatchNorm1d(2) after each block (after its ActNorm), none inside the residual nets.
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["ActNorm1d", "iResBlock", "ActNorm1d", "MovingBatchNormFlow1d", "iResBlock", "ActNorm1d",
                     "MovingBatchNormFlow1d"]
    assert [type(m).__name__ for m in model[1].nnet] == ["LipSwish", "InducedNormLinear", "LipSwish", "InducedNormLinear"]
    assert model[3].running_mean.shape == (2,)
    nvp = build_toy_model(ToyConfig(arch="realnvp", nblocks=2, dims=(8,), batchnorm=True))
    assert [type(m).__name__ for m in nvp] == ["CouplingBlock", "CouplingBlock", "MovingBatchNormFlow1d"] * 2
    assert [b.swap for b in nvp if hasattr(b, "swap")] == [False, True, False, True]
    assert not any(isinstance(m, MovingBatchNorm1d) for m in nvp[0].nnet)


def test_realnvp_starts_as_a_fixed_scaling():
    model = build_toy_model(ToyConfig(arch="realnvp", nblocks=1, dims=(8,)))
    x = torch.randn(5, 2)
    z, logdet = model(x)
    s = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(z, x * s)
    torch.testing.assert_close(logdet, torch.full((5,), 2 * math.log(s)))


@pytest.mark.parametrize("kw, match", [
    (dict(dims=(8, 8), vnorms="222"), "--vnorms needs one order per linear layer"),
    (dict(act="maxmin", dims=(8, 7)), "maxmin"),
    (dict(coeff=1.0), "--coeff"),
    (dict(act="softplus"), "--act"),
    (dict(data="spiral"), "--data"),
    (dict(nblocks=0), "--nblocks"),
    (dict(n_power_series=0), "--n-power-series"),
    (dict(dims="8-x"), "--dims"),
    (dict(vnorms="2a2"), "--vnorms"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        ToyConfig(**kw)


def test_config_round_trip_and_lipschitz_settings():
    cfg = ToyConfig(vnorms="2f2f2f", dims="8-8", n_lipschitz_iters=None, atol=1e-4)
    assert ToyConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.lipschitz_kwargs() == dict(n_iterations=None, atol=1e-4, rtol=None)
    assert ToyConfig(n_lipschitz_iters=None).lipschitz_kwargs() == dict(n_iterations=None, atol=1e-3, rtol=1e-3)
    assert ToyConfig().lipschitz_kwargs() == dict(n_iterations=5, atol=None, rtol=None)
