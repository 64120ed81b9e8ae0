"""bfloat16 residual branches (resflows.layers.precision): the Lipschitz safety of the rounded weights, every
gradient mode and route against float32, and one cast per layer and pass whatever the number of series terms."""
import copy

import pytest
import torch

from resflows import ModelConfig, ResidualFlow
from resflows.layers import iResBlock, precision
from resflows.layers.jacobian import batch_jacobian
from resflows.layers.lipschitz import InducedNorm, InducedNormLinear, LipschitzMap, LopLinear, lipschitz_layers
from tests.layers.test_linearize import model_branches

BF16 = torch.bfloat16
D64 = torch.float64
# A map's true operator norm may exceed coeff by at most this, relative (float32 rounding of the factor and
# of u^T W v; the float32 normalisation itself is held to the same bound below).
MARGIN = 2e-6


def effective_weight(m: LipschitzMap) -> torch.Tensor:
    """The linear map a bf16 layer applies, in float64: ``factor * float(round(W))`` (``W`` for the branch's
    last map, which stays float32)."""
    return precision.applied_weight(m, BF16).double()


def true_norm(m: InducedNorm, w: torch.Tensor, iters: int = 3000) -> float:
    """||w||_2 of the layer's whole operator (float64 power iteration, or the SVD of a matrix)."""
    if m._is_matrix:
        return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(m.v.shape, generator=g, dtype=D64)
    last = 0.0
    for _ in range(iters):
        v = m._rmatvec(w, m._matvec(w, v))
        norm = float(v.norm())
        v = v / norm
        if abs(norm - last) <= 1e-13 * norm:  # sigma^2 converged to float64 precision
            break
        last = norm
    return float(m._matvec(w, v).norm())


def round_up_coeff(n: int) -> float:
    """A coeff in [0.9, 0.99] for which coeff / n rounds up to bfloat16 by the most."""
    cs = torch.linspace(0.9, 0.99, 2001, dtype=torch.float32) / n
    ratio = cs.to(BF16).float() / cs
    return float(cs[ratio.argmax()] * n)


@pytest.mark.parametrize("cls", [InducedNormLinear, LopLinear])
def test_rounding_up_is_rescaled_to_coeff(cls):
    """All entries of the normalised weight round up: the rounded weight's norm exceeds coeff by more than
    2^-9 of it, and the map the bf16 layer applies (with its factor) is back at coeff."""
    n = 8
    coeff = round_up_coeff(n)
    m = cls(n, n, bias=False, coeff=coeff)
    with torch.no_grad():
        m.weight.fill_(1.0)  # sigma n (2-norm) or sqrt(n) / n (closed forms): the normalisation is active
    m.update_lipschitz(n_iterations=50)
    rounded = m.normalized_weight().detach().to(BF16).double()
    assert float(m.norm_of(rounded.float())) > coeff * (1 + 2**-9)
    eff = effective_weight(m)
    assert float(m.norm_of(eff.float())) <= coeff * (1 + MARGIN)
    if cls is InducedNormLinear:
        assert float(torch.linalg.matrix_norm(eff, 2)) <= coeff * (1 + MARGIN)


@pytest.fixture(scope="module")
def reference_model():
    """The reference configuration (MNIST 28x28, 2-2-2, idim 64), weights tripled so that every layer's
    normalisation is active, power iterations converged."""
    torch.manual_seed(0)
    model = ResidualFlow(ModelConfig(input_size=(1, 28, 28), nblocks=(2, 2, 2), idim=64, actnorm=True))
    with torch.no_grad():
        for m in lipschitz_layers(model):
            m.weight.mul_(3.0)
    model.update_lipschitz(atol=1e-9, rtol=1e-9, max_iterations=2000)
    return model.train()


def test_reference_layers_stay_within_coeff_in_bf16(reference_model):
    """Every normalised layer of the reference configuration: the true operator norm of the map it applies in
    bf16 is at most coeff (1 + MARGIN), while the rounded weight without the factor exceeds it in some."""
    excess_rounded, excess_bf16, excess_fp32 = [], [], []
    for m in lipschitz_layers(reference_model):
        rounded = m.normalized_weight().detach().to(BF16).double()
        fp32 = true_norm(m, m.normalized_weight().detach().double())
        excess_rounded.append(true_norm(m, rounded) / m.coeff - 1)
        excess_bf16.append(true_norm(m, effective_weight(m)) / max(m.coeff, fp32) - 1)
        excess_fp32.append(fp32 / m.coeff - 1)
    # The float32 layers are at coeff up to the power method's own accuracy (a layer whose top singular values
    # are close converges slowly: 2e-4 above coeff was seen); bf16 must add nothing measurable to that.
    assert max(excess_fp32) <= 1e-3
    assert max(excess_bf16) <= MARGIN, max(excess_bf16)
    assert max(excess_rounded) > 10 * MARGIN  # what the factor prevents


@pytest.mark.slow
def test_reference_branches_lipschitz_in_bf16(reference_model):
    """The true Lipschitz constant of each bf16 branch of the reference configuration (top singular value of
    its float64 Jacobian at random inputs, bf16 weights upcast with their factors) is at most coeff."""
    for block in reference_model.iresblocks():
        nnet = copy.deepcopy(block.nnet).double()
        for src, dst in zip(lipschitz_layers(block.nnet), lipschitz_layers(nnet)):
            eff = effective_weight(src)
            dst.normalized_weight = lambda w=eff: w  # the instance's map: the bf16 weight, upcast
        shape = block_input_shape(reference_model, block)
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=D64)
        x.requires_grad_(True)
        jac = batch_jacobian(nnet(x), x)
        top = torch.linalg.matrix_norm(jac, 2)
        coeff = lipschitz_layers(block.nnet)[0].coeff
        assert float(top.max()) <= coeff, (float(top.max()), coeff)


def block_input_shape(model, block):
    seen = {}
    # transform() calls the branch as a module (not the block): its input is the block's
    handle = block.nnet.register_forward_hook(lambda m, inp, out: seen.update(shape=tuple(inp[0].shape[1:])))
    with torch.no_grad(), precision.branch_dtype(None):
        model.eval()
        model.transform(torch.rand(1, 1, 28, 28))
        model.train()
    handle.remove()
    return seen["shape"]


# ------------------------------------------------------------------------------------------------
# Every gradient mode and route: bf16 against float32 with the same probe and roulette draw
# ------------------------------------------------------------------------------------------------
MODES = {"naive": (False, False), "neumann": (True, False), "mem_eff": (False, True), "both": (True, True)}


def run_block(nnet, mode, linearised, dtype, x0, probe):
    block = iResBlock(copy.deepcopy(nnet), n_exact_terms=2).train()
    block.neumann_grad, block.grad_in_forward = MODES[mode]
    block.use_linearize = linearised
    block.probe_fn = lambda x: probe
    block.generator = torch.Generator().manual_seed(4)
    x = x0.clone().requires_grad_(True)
    params = [p for p in block.nnet.parameters() if p.requires_grad]
    c = torch.randn(x0.shape, generator=torch.Generator().manual_seed(8))
    with precision.branch_dtype(dtype):
        y, ld = block(x)
        loss = (torch.linspace(0.5, 2.0, x0.shape[0]) * ld).sum() + (c * y).sum()
        grads = torch.autograd.grad(loss, [x] + params)
    return y.detach(), ld.detach(), grads


BRANCHES = {
    "conv": lambda: model_branches("swish", dropout=0.0)["conv"],
    "fc": lambda: model_branches("swish", dropout=0.0)["fc"],
    "densenet": lambda: model_branches("clipswish", densenet=True, dropout=0.0, densenet_depth=2, densenet_growth=4,
                                       fc_densenet_growth=4)["conv"],
}


@pytest.mark.parametrize("branch", list(BRANCHES))
@pytest.mark.parametrize("linearised", [True, False], ids=["linearised", "autograd"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_gradient_mode_in_bf16(mode, linearised, branch):
    """Outputs in float32; y, the log-det and every gradient (input and parameters) close to float32's, for
    convolutional, fully connected and dense branches."""
    nnet = BRANCHES[branch]().float()
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    y32, ld32, g32 = run_block(nnet, mode, linearised, None, x0, probe)
    y16, ld16, g16 = run_block(nnet, mode, linearised, BF16, x0, probe)
    assert y16.dtype == ld16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16)
    assert torch.allclose(y16, y32, atol=2e-2 * y32.abs().max())
    assert torch.allclose(ld16, ld32, atol=2e-2 * ld32.abs().max())
    for a, b in zip(g32, g16):
        # LipSwish slopes (one number: a sum over every activation, with heavy cancellation) are the least accurate.
        assert float((a - b).norm() / a.norm()) <= (5e-2 if a.numel() > 1 else 0.15)
    flat32, flat16 = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    assert float(torch.nn.functional.cosine_similarity(flat32, flat16, 0)) >= 0.999


def test_weights_cast_once_per_pass(monkeypatch):
    """The default path rounds each weight once in the forward pass and once in the backward's recomputation,
    and measures its norms once, whatever the number of series terms."""
    nnet = BRANCHES["conv"]().float()
    n_layers = len(lipschitz_layers(nnet))
    calls = {"cast": 0, "norm": 0}
    cast, norm = precision.branch_weights, InducedNorm.norm_of

    def counting_cast(*a, **k):
        calls["cast"] += 1
        return cast(*a, **k)

    def counting_norm(self, w):
        calls["norm"] += 1
        return norm(self, w)

    monkeypatch.setattr(precision, "branch_weights", counting_cast)
    monkeypatch.setattr(InducedNorm, "norm_of", counting_norm)
    x = torch.randn(4, 2, 4, 4)
    for terms in (2, 12):
        calls.update(cast=0, norm=0)
        block = iResBlock(copy.deepcopy(nnet), n_power_series=terms, grad_in_forward=True).train()
        with precision.branch_dtype(BF16):
            y, ld = block(x.clone().requires_grad_(True))
            (y.sum() + ld.sum()).backward()
        # Two norms per rounded layer (rounded and float32 weight); the last map stays float32 and needs none.
        assert calls == {"cast": 2 * n_layers, "norm": 2 * (n_layers - 1)}, (terms, calls)
