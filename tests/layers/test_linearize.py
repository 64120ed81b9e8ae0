"""The hand-written linearisation (resflows/layers/linearize.py) against autograd, for every module type it
accepts and every residual branch that ``--act`` builds: float64, random non-initial parameters.

For a module ``f`` (with its batch-norm means and dropout masks fixed as in the forward pass):
``primal(x) == f(x)``, ``tape_vjp(w) == w^T J``, ``dual(x, v) == (f(x), J v)`` and the gradient of
``u^T J v`` w.r.t. ``x`` and every parameter equals double backward through autograd.
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from resflows import ModelConfig, ResidualFlow
from resflows.cli import build_parser
from resflows.layers import (
    CLipSwish,
    Identity,
    InducedNormConv2d,
    InducedNormLinear,
    LipschitzCube,
    LipSwish,
    MaxMin,
    MovingBatchNorm1d,
    MovingBatchNorm2d,
    get_conv2d,
    get_linear,
    iResBlock,
    linearize,
    lipschitz_layers,
)
from resflows.layers.activations import CPila, CReLU, LeakyLSwish, Pila
from resflows.layers.dense import LipschitzDenseLayer
from resflows.layers.fc import FCNet
from resflows.layers.vardeq import conditioned_branch

D64 = torch.float64
RTOL = 1e-10
CONV_X, FC_X = (3, 2, 3, 3), (3, 5)


def act_choices():
    """The ``--act`` choices of train_img.py."""
    (action,) = [a for a in build_parser()._actions if a.dest == "act"]
    return list(action.choices)


def randomize(module: nn.Module, seed: int, weight_gain: float = 3.0) -> nn.Module:
    """Move every parameter away from its initial value; weights grow so that the Lipschitz normalisation is
    active (sigma > coeff); batch-norm means become non-zero."""
    g = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            gain = weight_gain if p.dim() > 1 else 1.0
            p.mul_(gain).add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in module.modules():
            if isinstance(m, (MovingBatchNorm1d, MovingBatchNorm2d)):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g, dtype=D64))
        for m in lipschitz_layers(module):
            m.update_lipschitz(n_iterations=3)
    return module


def inputs(shape, seed, scale=1.5):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


# -- cases: (module, input); every exact type registered in linearize.HANDLERS appears in one ------------
def _single(module, shape, train=True):
    return lambda: (randomize(module(), 1).train(train), inputs(shape, 2))


LEAF_CASES = {
    "induced_linear": _single(lambda: InducedNormLinear(5, 6, coeff=0.9), FC_X),
    "induced_linear_p3_p1.5": _single(lambda: InducedNormLinear(5, 6, coeff=0.9, domain=3, codomain=1.5), FC_X),
    "induced_linear_learned_orders": _single(
        lambda: get_linear(5, 6, coeff=0.9, domain=nn.Parameter(torch.tensor(0.4)), codomain=nn.Parameter(torch.tensor(-0.3))), FC_X),
    "lop_linear_columns": _single(lambda: get_linear(5, 6, coeff=0.9, domain=1, codomain=2), FC_X),
    "lop_linear_rows": _single(lambda: get_linear(5, 6, coeff=0.9, domain=2, codomain=float("inf")), FC_X),
    "linear": _single(lambda: nn.Linear(5, 6), FC_X),
    "induced_conv3x3": _single(lambda: InducedNormConv2d(2, 4, 3, 1, 1, coeff=0.9, spatial_dims=(3, 3)), CONV_X),
    "induced_conv1x1": _single(lambda: InducedNormConv2d(2, 4, 1, 1, 0, coeff=0.9, spatial_dims=(3, 3)), CONV_X),
    "lop_conv_columns": _single(lambda: get_conv2d(2, 4, 3, 1, 1, coeff=0.9, domain=1, codomain=2), CONV_X),
    "lop_conv_rows": _single(lambda: get_conv2d(2, 4, 3, 1, 1, coeff=0.9, domain=2, codomain=float("inf")), CONV_X),
    "conv": _single(lambda: nn.Conv2d(2, 3, 3, 1, 1), CONV_X),
    "lipswish": _single(LipSwish, CONV_X),
    "clipswish": _single(CLipSwish, CONV_X),
    "elu": _single(nn.ELU, CONV_X),
    "elu_alpha0.7": _single(lambda: nn.ELU(alpha=0.7), CONV_X),
    "softplus": _single(nn.Softplus, CONV_X),
    "softplus_beta2_threshold1.5": _single(lambda: nn.Softplus(beta=2.0, threshold=1.5), CONV_X),  # both branches
    "relu": _single(nn.ReLU, CONV_X),
    "tanh": _single(nn.Tanh, CONV_X),
    "lcube": _single(LipschitzCube, CONV_X),  # inputs on both sides of |x| = 1
    "identity": _single(Identity, CONV_X),
    "batchnorm1d_train": _single(lambda: MovingBatchNorm1d(5), FC_X),
    "batchnorm2d_train": _single(lambda: MovingBatchNorm2d(2), CONV_X),
    "batchnorm2d_eval": _single(lambda: MovingBatchNorm2d(2), CONV_X, train=False),
    "dropout_train": _single(lambda: nn.Dropout(0.3), FC_X),
    "dropout2d_train": _single(lambda: nn.Dropout2d(0.3), CONV_X),
    "dropout_eval": _single(lambda: nn.Dropout(0.3), FC_X, train=False),
    "sequential": _single(lambda: nn.Sequential(get_linear(5, 7, coeff=0.9), LipSwish(), nn.Dropout(0.2),
                                                get_linear(7, 5, coeff=0.9), nn.ELU()), FC_X),
    "fcnet": _single(lambda: FCNet((2, 3, 3), (1, 2, 3), 7, 2, "swish", True, 0.2,
                                   lambda i, a, b: get_linear(a, b, coeff=0.9)), CONV_X),
    "leakylswish": _single(LeakyLSwish, CONV_X),
    "cpila": _single(CPila, CONV_X),  # inputs on both sides of the kink at 0.2 and around the minimum
    "crelu": _single(CReLU, CONV_X),
    "pila": _single(Pila, CONV_X),
    "dense_layer_conv": _single(lambda: LipschitzDenseLayer(nn.Sequential(
        InducedNormConv2d(2, 3, 3, 1, 1, coeff=0.9, spatial_dims=(3, 3)), CLipSwish()), lip_coeff=0.95), CONV_X),
    "vardeq_branch": lambda: _conditioned_case(),
}


def _conditioned_case():
    """The dequantiser's branch g(s; x), conditioned on a fixed image (its conditioning net gets gradients too)."""
    torch.manual_seed(0)
    branch = conditioned_branch(2, 2, 4, "clipswish", lambda i, o, k: get_conv2d(i, o, k, 1, k // 2, coeff=0.9, spatial_dims=(3, 3)),
                                lip_coeff=0.95, cond_width=4, cond_hidden=64)  # 2 channels per group norm group
    branch = randomize(branch, 1).train()
    branch.condition = torch.rand(CONV_X, generator=torch.Generator().manual_seed(3), dtype=D64)
    return branch, inputs(CONV_X, 2)


def model_branches(act: str, **kw):
    """The residual branches train_img.py builds for ``--act``: a convolutional block (batch norm,
    pre-activation, Dropout2d) and an ``--fc-end`` block (FCNet with Dropout). Fresh copies."""
    return copy.deepcopy(_model_branches(act, tuple(sorted(kw.items()))))


@functools.lru_cache(maxsize=None)
def _model_branches(act: str, kw):
    cfg = dict(input_size=(2, 4, 4), nblocks=(1,), idim=6, fc_idim=8, fc_nblocks=1, act=act, actnorm=False,
               batchnorm=True, dropout=0.2)
    cfg.update(dict(kw))
    torch.manual_seed(0)
    blocks = ResidualFlow(ModelConfig(**cfg)).iresblocks()
    assert isinstance(blocks[-1].nnet, FCNet)
    return {"conv": blocks[0].nnet, "fc": blocks[1].nnet}


def _branch_case(act, kind, **kw):
    return lambda: (randomize(model_branches(act, **kw)[kind], 3, weight_gain=2.0).train(), inputs((3, 2, 4, 4), 4))


ACT_CASES = {f"{act}_{kind}": _branch_case(act, kind) for act in act_choices() for kind in ("conv", "fc")}
ACT_CASES["swish_conv_learn_p"] = _branch_case("swish", "conv", learn_p=True)
ACT_CASES["elu_conv_p3"] = _branch_case("elu", "conv", vnorms=(2, 3, 3, 2))
# i-DenseNet branches (conv and --fc-end), with and without learnable concatenation.
ACT_CASES["densenet_clipswish_conv"] = _branch_case("clipswish", "conv", densenet=True, dropout=0.0, densenet_depth=2, densenet_growth=4,
                                                    fc_densenet_growth=4)
ACT_CASES["densenet_clipswish_fc"] = _branch_case("clipswish", "fc", densenet=True, dropout=0.0, densenet_depth=2, densenet_growth=4,
                                                  fc_densenet_growth=4)
ACT_CASES["densenet_swish_fixed_concat_conv"] = _branch_case("swish", "conv", densenet=True, dropout=0.0, densenet_depth=2,
                                                             densenet_growth=3, fc_densenet_growth=3, learnable_concat=False)
# Monotone Flows: the dense CPila branches of a --monotone_resolvent model (the same branch classes).
for _kind in ("conv", "fc"):
    ACT_CASES[f"monotone_densenet_cpila_{_kind}"] = _branch_case("cpila", _kind, densenet=True, monotone_resolvent=True, dropout=0.0,
                                                                 batchnorm=False, densenet_depth=2, densenet_growth=4, fc_densenet_growth=4)
CASES = {**LEAF_CASES, **ACT_CASES}


def test_every_linearised_type_and_every_act_has_a_case():
    covered = {type(m) for build in LEAF_CASES.values() for m in build()[0].modules()}
    missing = set(linearize.HANDLERS) - covered
    assert not missing, f"add a case to tests/layers/test_linearize.py for {sorted(c.__name__ for c in missing)}"
    # ACT_CASES are generated from the --act choices: a new choice gets its two cases automatically (and
    # test_linearisation_equals_autograd fails for them until linearize supports its branches).
    assert len(ACT_CASES) >= 2 * len(act_choices())


# -- the checks ----------------------------------------------------------------------------------------
def assert_close(actual, expected, rtol=RTOL, what=""):
    scale = max(float(expected.abs().max()), 1e-6) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


class Reference:
    """The module as autograd sees it, run from the state it had before the linearised forward (batch-norm
    means) and with the same random stream (dropout masks), with parameters passed explicitly."""

    def __init__(self, module: nn.Module, seed: int):
        self.module, self.seed = module, seed
        # Parameters stay nn.Parameter: layers with learned norm orders check for that type.
        self.params = {k: nn.Parameter(p.detach().clone(), requires_grad=False) for k, p in module.named_parameters()}
        self.buffers = {k: b.clone() for k, b in module.named_buffers()}
        self.buffers_after = None

    def __call__(self, x, params=None):
        buffers = {k: b.clone() for k, b in self.buffers.items()}
        torch.manual_seed(self.seed)
        y = functional_call(self.module, {**(params or self.params), **buffers}, (x,))
        self.buffers_after = buffers
        return y


def _grads(out, wrt):
    if not out.requires_grad:  # a constant Jacobian (shift, mask, identity)
        return [torch.zeros_like(t) for t in wrt]
    grads = torch.autograd.grad(out, wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_linearisation_equals_autograd(name):
    module, x = CASES[name]()
    assert linearize.supports(module)
    ref = Reference(module, seed=7)
    torch.manual_seed(7)
    y, tape = linearize.primal(module, x)
    assert_close(y, ref(x), what="primal")
    for key, b in module.named_buffers():  # running means updated exactly as the module's forward does
        assert_close(b, ref.buffers_after[key], what=f"buffer {key}")

    gen = torch.Generator().manual_seed(11)
    w = torch.randn(y.shape, generator=gen, dtype=D64)
    v = torch.randn(x.shape, generator=gen, dtype=D64)
    u = torch.randn(y.shape, generator=gen, dtype=D64)
    w_copy = w.clone()
    xr = x.clone().requires_grad_(True)
    (vjp_ref,) = torch.autograd.grad(ref(xr), xr, w)
    assert_close(linearize.tape_vjp(tape, w), vjp_ref, what="vjp")
    assert torch.equal(w, w_copy)  # the caller's vector is not overwritten

    tape = linearize.strip_tape(tape)  # what the backward pass keeps
    _, jvp_ref = torch.autograd.functional.jvp(ref, x, v)
    y_dual, jv = linearize.dual(module, x, v, tape)
    assert_close(y_dual, ref(x), what="dual primal")
    assert_close(jv, jvp_ref, what="jvp")

    # d(w^T f(x) + u^T J v) w.r.t. x and every parameter (what the Neumann backward pass differentiates):
    # first-order backward through dual vs double backward through autograd.
    names = [k for k, p in module.named_parameters() if p.requires_grad]
    params = [p for k, p in module.named_parameters() if p.requires_grad]
    xd = x.clone().requires_grad_(True)
    y_dual, jv = linearize.dual(module, xd, v, tape)
    got = _grads((w * y_dual).sum() + (u * jv).sum(), [xd] + params)
    pr = {k: nn.Parameter(p.clone()) for k, p in ref.params.items()}
    xr = x.clone().requires_grad_(True)
    y_ref = ref(xr, pr)
    (ujac,) = torch.autograd.grad(y_ref, xr, u, create_graph=True)
    expected = _grads((w * y_ref).sum() + (ujac * v).sum(), [xr] + [pr[k] for k in names])
    for what, a, b in zip(["x"] + names, got, expected):
        assert_close(a, b, what=f"d(w^T f + u^T J v)/d {what}")


# -- exact-type dispatch ---------------------------------------------------------------------------------
class HalvedELU(nn.ELU):
    """A subclass whose forward differs from its parent's: must not be linearised as an ELU."""

    def forward(self, x):
        return 0.5 * super().forward(x)


class ShiftedLinear(InducedNormLinear):
    def forward(self, x):
        return super().forward(x + 1.0)


class ScaledLipSwish(LipSwish):
    def forward(self, x):
        return 0.9 * super().forward(x)


@pytest.mark.parametrize("odd", [HalvedELU(), ShiftedLinear(5, 5), ScaledLipSwish(), nn.ReLU(inplace=True), MaxMin(),
                                 nn.Conv2d(5, 5, 3, 2, 1), nn.Conv2d(5, 5, 3, 1, 1, padding_mode="reflect")])
def test_subclasses_and_unsupported_modules_are_not_linearised(odd):
    assert not linearize.supports(odd)
    assert not linearize.supports(nn.Sequential(get_linear(5, 5), odd, get_linear(5, 5)))
    block = iResBlock(nn.Sequential(get_linear(5, 5), odd, get_linear(5, 5)))
    assert not block.linearizable
