"""ResidualFlow: paper-compatible state_dict, forward/inverse, exact log-det, heads, maintenance."""
import math

import pytest
import torch

from resflows import ModelConfig, ResidualFlow, exact_logdet
from resflows.config import ConfigError
from resflows.layers.lipschitz import norm_order_gradients

D64 = torch.float64

# Reference state_dict files (produced by the paper's code) and the flags that built them.
REFERENCE_CONFIGS = {
    "mnist28_2-2-2_idim64.txt": dict(input_size=(1, 28, 28), nblocks="2-2-2", idim=64, logit_alpha=1e-6),
    "cifar32_2-2-2_idim64_factorout_hybrid.txt": dict(
        input_size=(3, 32, 32), nblocks="2-2-2", idim=64, factor_out=True, fc_end=False, classification=True,
        init_layer="normalize"),
    "cifar32_2-2_idim32_coupling.txt": dict(input_size=(3, 32, 32), block="coupling", nblocks="2-2", idim=32),
    "cifar32_1-1_idim32_quadratic_fcactnorm_batchnorm.txt": dict(
        input_size=(3, 32, 32), nblocks="1-1", idim=32, quadratic=True, fc_actnorm=True, batchnorm=True, fc_end=False),
    "cifar32_1-1_idim16_learnp_vnorms2222_squeezefirst-input12x16x16.txt": dict(
        input_size=(3, 32, 32), squeeze_first=True, nblocks="1-1", idim=16, learn_p=True, fc_end=False),
    "mnist28_1-1-1_idim32_kernels3-3_vnorms333_factorout.txt": dict(
        input_size=(1, 28, 28), nblocks="1-1-1", idim=32, kernels="3-3", vnorms="333", factor_out=True),
}


def read_reference(path):
    out = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        out.append((key, shape, dtype))
    return out


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_state_dict_matches_the_paper(reference_dir, name):
    model = ResidualFlow(ModelConfig(**REFERENCE_CONFIGS[name]))
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert ours == read_reference(reference_dir / "state_dict" / name)


def test_every_reference_file_is_tested(reference_dir):
    paper = [p.name for p in (reference_dir / "state_dict").glob("*.txt") if not p.name.startswith("idensenet_")]
    assert sorted(paper) == sorted(REFERENCE_CONFIGS)  # the i-DenseNets files: tests/test_idensenet.py


def tiny(**kw):
    base = dict(input_size=(1, 8, 8), nblocks=(1, 1), idim=8, fc_idim=16, fc_nblocks=1)
    base.update(kw)
    return ResidualFlow(ModelConfig(**base))


def _init(model, x):
    model.train()
    with torch.no_grad():
        model(x)  # data-dependent ActNorm initialisation
    return model


@pytest.mark.parametrize("kw", [
    dict(),
    dict(factor_out=True, fc_end=False),
    dict(squeeze_first=True, nblocks=(1,), input_size=(1, 8, 8)),
    dict(block="coupling"),
    dict(block="coupling", input_size=(3, 8, 8)),
    dict(quadratic=True, fc_actnorm=True, batchnorm=True),
    dict(fc=True, nblocks=(1,)),
    dict(act="elu", kernels=(3, 3), vnorms=(2, 2, 2)),
    dict(act="clipswish"),
])
def test_forward_inverse_and_exact_logdet(kw):
    torch.manual_seed(0)
    model = tiny(**kw).double()
    x = torch.rand(4, *model.config.input_size, dtype=D64) * 0.9 + 0.05
    _init(model, x)
    model.eval()
    for blk in model.iresblocks():
        blk.brute_force = True  # exact per-block log-dets
        blk.inverse_atol, blk.inverse_rtol = 1e-22, 0.0
    z, logdet = model(x[:2])
    assert z.shape == (2, model.latent_dim) and z.shape[1] == x[0].numel()
    z_ex, logdet_ex = exact_logdet(model, x[:2])
    assert torch.allclose(z, z_ex)
    assert torch.allclose(logdet, logdet_ex, rtol=1e-6), (logdet, logdet_ex)
    assert torch.allclose(model.inverse(z), x[:2], atol=1e-8)


def test_latent_order_is_factored_parts_then_last_scale():
    torch.manual_seed(0)
    model = tiny(factor_out=True, fc_end=False, input_size=(1, 16, 16), nblocks=(1, 1, 1)).double()
    x = torch.rand(2, 1, 16, 16, dtype=D64)
    _init(model, x)
    model.eval()
    z = model.transform(x)
    # scale 0: 1x16x16 -> squeeze 4x8x8, factor out 2x8x8; scale 1: 2x8x8 -> 8x4x4, factor out 4x4x4
    assert [tuple(d) for d in model.dims] == [(2, 8, 8), (4, 4, 4), (4, 4, 4)]
    h = model.transforms[0].transform(x)
    assert torch.allclose(z[:, : 2 * 64], h[:, 2:].reshape(2, -1))


def test_classification_and_hybrid_heads():
    torch.manual_seed(0)
    model = tiny(classification=True, input_size=(3, 8, 8), cdim=16)
    x = torch.rand(5, 3, 8, 8)
    _init(model, x)
    z, logdet, logits = model.forward_with_logits(x)
    assert logits.shape == (5, 10) and z.shape == (5, 192) and logdet.shape == (5,)
    assert torch.allclose(model.classify(x), logits, atol=1e-5)  # same heads without the log-det
    with pytest.raises(RuntimeError, match="no classification heads"):
        tiny().classify(x[:, :1])


def test_every_trainable_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = tiny(learn_p=True, batchnorm=True, classification=True, cdim=8, fc_end=True)
    with torch.no_grad():  # make every normalisation active, so learned norm orders matter
        for m in model.modules():
            if hasattr(m, "learnable_orders"):
                m.weight.mul_(5)
    model.update_lipschitz()
    x = torch.rand(4, 1, 8, 8)
    _init(model, x)
    model.train()
    z, logdet, logits = model.forward_with_logits(x)
    (z.pow(2).sum() - logdet.sum() + logits.sum()).backward()
    orders = [p for name, p in model.named_parameters() if name.endswith(("domain", "codomain"))]
    assert orders and all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in orders)  # not from the loss...
    norm_order_gradients(model)  # ...but from their own objective, as the paper
    for name, p in model.named_parameters():
        if name.endswith(("geom_p", "lamb")):
            assert p.grad is None and not p.requires_grad
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw,match", [
    (dict(input_size=(1, 8, 8), nblocks=(1, 1, 1)), "at most 2"),
    (dict(input_size=(1, 18, 18), nblocks=(1, 1, 1)), "cannot be squeezed"),
    (dict(kernels=(3, 1, 3), vnorms=(2, 2)), "one more order"),
    (dict(kernels=(3, 2, 3)), "odd"),
    (dict(n_dist="uniform"), "poisson or geometric"),
])
def test_bad_architectures_are_clear_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_maintenance_methods():
    torch.manual_seed(0)
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)
    iters = model.update_lipschitz()
    assert iters >= 1
    lips = model.lipschitz_constants()
    assert lips and all(0 < v <= model.config.coeff + 1e-9 for v in lips.values())
    assert set(model.norm_orders().values()) == {(2.0, 2.0)}
    x = torch.rand(3, 1, 8, 8)
    model.train()
    model(x)
    moments = model.estimator_moments()
    assert len(moments) == len(model.iresblocks())
    assert all(math.isfinite(a) and b >= 0 for a, b in moments.values())


@pytest.mark.parametrize("flags, expected_iters, expected_tolerance", [
    (["--sn-tol", "0.01"], None, (0.01, 0.01)),                           # iterate to --sn-tol
    (["--sn-tol", "0.01", "--n-lipschitz-iters", "3"], 3, (None, None)),  # exactly N steps, no tolerance
])
def test_the_power_iteration_settings_a_layer_uses(monkeypatch, flags, expected_iters, expected_tolerance):
    """--n-lipschitz-iters / --sn-tol reach every normalised layer through one path, the model's
    lipschitz_defaults; the layers store no settings that could disagree with it."""
    from resflows.cli import parse_args
    from resflows.factory import model_config_from
    from resflows.layers.lipschitz import InducedNorm, lipschitz_layers

    cfg, _ = parse_args(["--data", "digits", "--nblocks", "1-1", "--idim", "8", "--fc-idim", "16", *flags])
    torch.manual_seed(0)
    model = ResidualFlow(model_config_from(cfg))
    layers = [m for m in lipschitz_layers(model) if isinstance(m, InducedNorm)]
    assert layers
    for m in layers:
        assert not {"n_iterations", "atol", "rtol"} & set(vars(m)), type(m).__name__
    seen = []
    real_step = InducedNorm.power_step

    def spy(self, atol=None, rtol=None):
        seen.append((id(self), atol, rtol))
        return real_step(self, atol, rtol)

    monkeypatch.setattr(InducedNorm, "power_step", spy)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(1.5)  # new weights: the power method has work to do
    iters = model.update_lipschitz()
    assert {(atol, rtol) for _, atol, rtol in seen} == {expected_tolerance}
    if expected_iters is None:
        assert {i for i, _, _ in seen} == {id(m) for m in layers}  # every layer checked against the tolerance
        assert 1 <= iters < 200
    else:
        assert iters == expected_iters
