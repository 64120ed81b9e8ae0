"""train_toy.py as the paper's toy script (docs/paper-differences.md, "Where we differ", item 9): Adam betas, --batchnorm after each block,
--vnorms without --mixed, 200 power iterations before each test evaluation, learned orders' objective."""
import copy
import math

import torch

from resflows.layers import InducedNormLinear, LopLinear
from resflows.toy import ToyConfig, build_toy_model
from resflows.toy.train import ToyTrainer

SMALL = dict(nblocks=2, dims=(8, 8), data="8gaussians", batch_size=64, test_batch_size=256, viz_npts=20)


def trainer(tmp_path, **kw):
    cfg = ToyConfig(**{**SMALL, **kw})
    return ToyTrainer(cfg, build_toy_model(cfg), torch.device("cpu"), str(tmp_path))


def test_adam_with_torch_default_betas(tmp_path):
    t = trainer(tmp_path)
    assert isinstance(t.optimizer, torch.optim.Adam) or isinstance(t.optimizer, torch.optim.AdamW)
    assert [g["betas"] for g in t.optimizer.param_groups] == [(0.9, 0.999)]


def test_batchnorm_is_a_flow_layer_after_each_block(tmp_path):
    model = build_toy_model(ToyConfig(**{**SMALL, "batchnorm": True}))
    assert [type(m).__name__ for m in model] == ["iResBlock", "MovingBatchNormFlow1d"] * 2
    assert "chain.1.running_mean" in model.state_dict()  # the paper's key for MovingBatchNorm1d(2)
    model.train()
    x = torch.randn(16, 2) + 3
    for _ in range(3):
        model(x)
    model.eval()
    z, logdet = model(x)
    assert torch.allclose(model.invert(z), x, atol=1e-4)


def test_unmixed_orders_follow_vnorms():
    model = build_toy_model(ToyConfig(nblocks=1, dims=(8, 8), vnorms="3f23", mixed=False))
    orders = [m.norm_orders() for m in model[0].nnet if isinstance(m, (InducedNormLinear, LopLinear))]
    assert orders == [(3, math.inf), (math.inf, 2), (2, 3)]


def test_validation_runs_200_power_iterations_that_training_keeps(tmp_path):
    t = trainer(tmp_path)
    t.run_step()
    twin = copy.deepcopy(t.model)
    before = [m.u.clone() for m in t.model.modules() if isinstance(m, InducedNormLinear)]
    t.validate()
    twin.update_lipschitz(n_iterations=200)
    after = [m.u for m in t.model.modules() if isinstance(m, InducedNormLinear)]
    expected = [m.u for m in twin.modules() if isinstance(m, InducedNormLinear)]
    assert all(torch.equal(a, e) for a, e in zip(after, expected))
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_learned_orders_step_on_their_own_objective(tmp_path):
    from resflows.layers.lipschitz import norm_order_gradients

    t = trainer(tmp_path, learn_p=True)
    orders = [p for n, p in t.model.named_parameters() if n.endswith("domain")]
    seen = {}
    step = t.optimizer.step

    def spy():
        seen.update({id(p): None if p.grad is None else p.grad.clone() for p in orders})
        step()

    twin = copy.deepcopy(t.model)
    t.optimizer.step = spy
    t.run_step()
    norm_order_gradients(twin)
    twin_orders = [p for n, p in twin.named_parameters() if n.endswith("domain")]
    for p, q in zip(orders, twin_orders):
        assert seen[id(p)] is not None and torch.allclose(seen[id(p)], q.grad)
