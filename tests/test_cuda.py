"""CUDA against CPU float64: every gradient mode, the linearised path, fixed-point inversion, NCCL, TF32 off.

Marked ``cuda``; every CUDA case skips without a GPU. ``tests/conftest.py`` hides GPUs from the default suite
(``CUDA_VISIBLE_DEVICES=""`` unless set), so run them through ``make gpu-check`` (benchmarks/gpu_check.py),
which sets ``CUDA_VISIBLE_DEVICES``. The CPU float32 cases run everywhere: they check the comparison itself
(tolerances, fixed probes and series lengths) on the hardware CI has.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from resflows.config import TrainConfig
from resflows.factory import model_config_from
from resflows.layers import linearize
from resflows.model import ResidualFlow
from tests.conftest import REPO

pytestmark = pytest.mark.cuda

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (run `make gpu-check` on a GPU machine)")
# (device, dtype, relative tolerance against CPU float64): CUDA in float64 must agree to 1e-5; float32 (CPU and
# CUDA) carries ~1e-5 rounding on its own and is held to 1e-3 (more would mean a wrong kernel, not rounding).
DEVICES = [
    pytest.param("cpu", torch.float32, 1e-3, id="host-float32"),
    pytest.param("cuda", torch.float64, 1e-5, id="cuda-float64", marks=needs_cuda),
    pytest.param("cuda", torch.float32, 1e-3, id="cuda-float32", marks=needs_cuda),
]
MODES = {
    "naive": dict(neumann_grad=False, mem_eff=False),
    "neumann": dict(neumann_grad=True, mem_eff=False),
    "mem-eff": dict(neumann_grad=False, mem_eff=True),
    "both": dict(neumann_grad=True, mem_eff=True),
}


@pytest.fixture(autouse=True)
def _full_float32():
    """Compare in full float32: TF32 (10-bit mantissa) would be ~1e-3 off by design."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _reference_model(mode: str = "both") -> ResidualFlow:
    """A small two-scale model on 8x8 digits-shaped input, float64, ActNorm initialised."""
    torch.manual_seed(0)
    cfg = TrainConfig(data="digits", nblocks="1-1", idim=8, fc_idim=16, seed=0, **MODES[mode])
    model = ResidualFlow(model_config_from(cfg)).double()
    with torch.no_grad():
        model.train()
        model.transform(_inputs())
    return model


def _inputs(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return (torch.randint(0, 256, (n, 1, 8, 8), generator=g).double() + torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)) / 256


def _fix_noise(model: ResidualFlow) -> None:
    """Same Hutchinson probes and series lengths on every device: probes drawn on the CPU in float64, then
    moved; the truncation draws from a seeded CPU generator per block."""
    for i, block in enumerate(model.iresblocks()):
        block.generator = torch.Generator().manual_seed(100 + i)

        def probe(x, i=i):
            g = torch.Generator().manual_seed(200 + i)
            return torch.randn(x.shape, generator=g, dtype=torch.float64).to(device=x.device, dtype=x.dtype)

        block.probe_fn = probe


def _step(model: ResidualFlow, x: torch.Tensor):
    """Outputs and parameter gradients of one training-mode forward/backward (a bits/dim-like loss)."""
    model.train()
    _fix_noise(model)
    model.zero_grad(set_to_none=True)
    z, logdet = model(x)
    loss = (0.5 * z.pow(2).sum(1) - logdet).mean()
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return z.detach().double().cpu(), logdet.detach().double().cpu(), grads


def _assert_close(a: torch.Tensor, ref: torch.Tensor, what: str, rtol: float, floor: float = 1e-6) -> None:
    """Relative to the float64 reference, in norm: ||a - ref|| <= rtol max(||ref||, floor) per tensor (the floor
    keeps gradients that are zero up to rounding from being compared relative to their rounding)."""
    err = float((a - ref).norm())
    scale = float(ref.norm())
    assert err <= rtol * max(scale, floor), f"{what}: ||a - ref|| = {err:.3g}, ||ref|| = {scale:.3g}"


@pytest.mark.parametrize("device,dtype,rtol", DEVICES)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_gradient_modes_match_cpu_float64(mode, device, dtype, rtol):
    if device == "cpu" and mode != "both":
        pytest.skip("the CPU float32 self-check of the comparison runs for the default mode only (time)")
    ref_model = _reference_model(mode)
    model = copy.deepcopy(ref_model).to(device=device, dtype=dtype)
    x = _inputs()
    z_ref, ld_ref, g_ref = _step(ref_model, x)
    z, ld, g = _step(model, x.to(device=device, dtype=dtype))
    _assert_close(z, z_ref, "z", rtol)
    _assert_close(ld, ld_ref, "logdet", rtol)
    assert g.keys() == g_ref.keys() and len(g_ref) > 10
    total = float(torch.stack([v.norm() for v in g_ref.values()]).norm())
    for name in g_ref:
        _assert_close(g[name], g_ref[name], f"grad {name}", rtol, floor=1e-3 * total)


@pytest.mark.parametrize("device,dtype,rtol", DEVICES)
def test_linearised_branch_on_device(device, dtype, rtol):
    """primal / tape_vjp / dual of a residual branch on the device == autograd in float64 on the CPU."""
    ref = _reference_model().iresblocks()[0].nnet
    net = copy.deepcopy(ref).to(device=device, dtype=dtype)
    x = torch.randn(4, *_inputs().shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if x.shape[1] != _first_in_channels(ref):
        x = torch.randn(4, _first_in_channels(ref), *x.shape[2:], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn_like(x)
    assert linearize.supports(net)
    x_ = x.clone().requires_grad_(True)
    g_ref = ref(x_)
    (vjp_ref,) = torch.autograd.grad(g_ref, x_, w)
    _, jvp_ref = torch.autograd.functional.jvp(ref, x, w)
    xd, wd = x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)
    g, tape = linearize.primal(net, xd)
    vjp = linearize.tape_vjp(tape, wd)
    g2, jvp = linearize.dual(net, xd, wd, linearize.strip_tape(tape))
    _assert_close(g.double().cpu(), g_ref.detach(), "g", rtol)
    _assert_close(g2.detach().double().cpu(), g_ref.detach(), "g (dual)", rtol)
    _assert_close(vjp.double().cpu(), vjp_ref, "w^T J", rtol)
    _assert_close(jvp.detach().double().cpu(), jvp_ref, "J v", rtol)


def _first_in_channels(net) -> int:
    for m in net.modules():
        if hasattr(m, "in_channels"):
            return m.in_channels
    raise AssertionError("no convolution in the branch")


@pytest.mark.parametrize("device,dtype,rtol", DEVICES)
def test_fixed_point_inversion_on_device(device, dtype, rtol):
    ref = _reference_model().eval()
    model = copy.deepcopy(ref).to(device=device, dtype=dtype)
    x = _inputs()
    with torch.no_grad():
        z = model.transform(x.to(device=device, dtype=dtype))
        x_rec = model.inverse(z)
        x_ref = ref.inverse(ref.transform(x))
    assert float((x_rec.double().cpu() - x).abs().max()) < 1e-3
    assert float((x_ref - x).abs().max()) < 1e-4


TINY = ["--data", "digits", "--nblocks", "1-1", "--idim", "8", "--fc-idim", "16", "--nworkers", "0",
        "--print-freq", "1", "--vis-freq", "1000", "--seed", "3", "--batchsize", "40", "--max-iters", "3"]


@needs_cuda
def test_nccl_training_run(tmp_path):
    """train_img.py under torchrun on CUDA (NCCL): 2 processes if 2 GPUs exist (ranks end bitwise identical),
    else 1 process."""
    n = min(2, torch.cuda.device_count())
    worker = REPO / "tests" / "distributed" / "worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(worker), "state",
           str(tmp_path), "--"] + TINY + ["--device", "cuda", "--save", str(tmp_path / "run")]
    env = {**os.environ, "RESFLOWS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(n)]
    assert states[0]["step"] == 3
    for other in states[1:]:
        for k, v in states[0]["model"].items():
            assert torch.equal(v, other["model"][k]), k


@needs_cuda
def test_train_img_leaves_tf32_off_by_default(tmp_path):
    """After train_img.py's set-up, float32 matmuls and convolutions run in full float32 (``--tf32`` off)."""
    import train_img

    seen = {}

    def hook(stage, trainer):
        if stage == "ready":
            seen["tf32"] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # torch's cuDNN default is True
    try:
        assert train_img.run(TINY + ["--max-iters", "1", "--device", "cuda", "--save", str(tmp_path / "run")], hook) == 0
    finally:
        train_img.cleanup_distributed()
    assert seen["tf32"] == (False, False)


def _monotone_reference_model(mode: str) -> ResidualFlow:
    """A small Monotone Flows model (dense CPila branches, monotone blocks), float64, ActNorm initialised, solves
    held to 1e-10 so that devices differ by rounding only."""
    torch.manual_seed(0)
    cfg = TrainConfig(data="digits", nblocks="1-1", seed=0, densenet=True, monotone_resolvent=True, act="CPila",
                      densenet_depth=2, densenet_growth=8, fc_densenet_growth=8, n_exact_terms=4, **MODES[mode])
    model = ResidualFlow(model_config_from(cfg)).double()
    for block in model.iresblocks():
        block.inverse_atol = block.inverse_rtol = block.adjoint_rtol = 1e-10
    with torch.no_grad():
        model.train()
        model.transform(_inputs())
    return model


@pytest.mark.parametrize("device,dtype,rtol", DEVICES)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_monotone_gradient_modes_match_cpu_float64(mode, device, dtype, rtol):
    """Monotone blocks (solves, implicit gradients, every log-det gradient mode) on the device against CPU float64."""
    if device == "cpu" and mode != "both":
        pytest.skip("the CPU float32 self-check of the comparison runs for the default mode only (time)")
    ref_model = _monotone_reference_model(mode)
    model = copy.deepcopy(ref_model).to(device=device, dtype=dtype)
    x = _inputs()
    z_ref, ld_ref, g_ref = _step(ref_model, x)
    z, ld, g = _step(model, x.to(device=device, dtype=dtype))
    _assert_close(z, z_ref, "z", rtol)
    _assert_close(ld, ld_ref, "logdet", rtol)
    assert g.keys() == g_ref.keys() and len(g_ref) > 10
    total = float(torch.stack([v.norm() for v in g_ref.values()]).norm())
    for name in g_ref:
        _assert_close(g[name], g_ref[name], f"grad {name}", rtol, floor=1e-3 * total)
