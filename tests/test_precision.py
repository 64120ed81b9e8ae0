"""``--precision``: bf16 training against float32 on the reference configuration (same weights, probe and
roulette draw), float32 evaluation and inversion whatever the training precision, checkpoints interchangeable
between precisions, the ``--tf32`` alias, and what each device is told."""
import copy

import numpy as np
import pytest
import torch

import train_img
import train_toy
from resflows import ModelConfig, ResidualFlow, bits_per_dim, load_model, runtime
from resflows.cli import parse_args
from resflows.layers import precision
from tests.helpers import TINY, cli, run_ok

BF16 = torch.bfloat16
REFERENCE = dict(input_size=(1, 28, 28), nblocks=(2, 2, 2), idim=64, actnorm=True)  # --data mnist --imagesize 28 ...
Z_RTOL = BPD_ATOL = 2e-3


def digits28(n: int, seed: int) -> torch.Tensor:
    """scikit-learn's digits upsampled to 28x28 (8 bits), dequantised: MNIST-shaped images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).choice(len(d.images), n, replace=False)
    imgs = np.stack([np.asarray(Image.fromarray(np.clip(np.round(im * 255 / 16), 0, 255).astype(np.uint8))
                                .resize((28, 28), Image.BILINEAR)) for im in d.images[idx]])
    x = torch.from_numpy(imgs).float().unsqueeze(1)
    return (x + torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))) / 256


def forward_backward(model, x, dtype, seed=5):
    """z, per-image bits/dim and every parameter's gradient of the mean bits/dim, with the probes and
    truncation draws of ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with precision.branch_dtype(dtype):
        z, logdet = model(x)
        bpd = bits_per_dim(z, logdet, (1, 28, 28), 256)
        bpd.mean().backward()
    return z.detach(), bpd.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, x, z_rtol=Z_RTOL):
    """bf16 against float32 on one batch: per-image bits/dim within 2e-3; z within 2e-3 relative (per image,
    in norm: bfloat16 rounds each branch's inputs and outputs to 8 bits, so single entries of z move by up to
    about one bfloat16 step of the residual stream's values, 1e-2 at init, while the norm moves by ~1e-3);
    every weight and bias gradient within 2e-2 relative error and cosine 0.999 (measured at init on digits:
    1.3e-2 and 0.99992; 5.0e-2 before the branches' last maps stayed float32, see
    resflows.layers.precision)."""
    z32, bpd32, g32 = forward_backward(model, x, None)
    z16, bpd16, g16 = forward_backward(model, x, BF16)
    assert z16.dtype == bpd16.dtype == torch.float32
    z_rel = float(((z16 - z32).norm(dim=1) / z32.norm(dim=1)).max())
    bpd_err = float((bpd16 - bpd32).abs().max())
    assert set(g16) == set(g32)
    rel = {n: float((g16[n] - g32[n]).norm() / g32[n].norm()) for n in g32}
    cos = {n: float(torch.nn.functional.cosine_similarity(g16[n].flatten(), g32[n].flatten(), 0)) for n in g32}
    tensors = [n for n in g32 if g32[n].numel() > 1]  # every weight and bias
    scalars = [n for n in g32 if g32[n].numel() == 1]  # LipSwish slopes, ActNorm of one channel: single numbers
    flat32 = torch.cat([g32[n].flatten() for n in g32])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    summary = {"z_rel": z_rel, "z_abs": float((z16 - z32).abs().max()), "bpd": bpd_err,
               "grad_rel_max": max(rel[n] for n in tensors), "grad_cos_min": min(cos[n] for n in tensors),
               "scalar_rel_max": max(rel[n] for n in scalars),
               "cos_all": float(torch.nn.functional.cosine_similarity(flat16, flat32, 0))}
    print(summary)
    assert z_rel <= z_rtol and bpd_err <= BPD_ATOL, summary
    assert all(g16[n].dtype == torch.float32 for n in g16)
    assert summary["grad_rel_max"] <= 2e-2 and summary["grad_cos_min"] >= 0.999, summary
    # A single number summed over every activation of a layer (heavy cancellation; 0.15 measured at init).
    assert summary["scalar_rel_max"] <= 0.3 and summary["cos_all"] >= 0.999, summary
    return summary


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = ResidualFlow(ModelConfig(**REFERENCE)).train()
    with torch.no_grad():
        model.transform(digits28(64, seed=1))  # data-dependent ActNorm initialisation
    return model


def test_bf16_matches_fp32_on_the_reference_configuration_at_init(reference):
    """Same weights, probe and roulette draw (on a batch other than the ActNorm one): see :func:`compare`."""
    compare(reference, digits28(16, seed=2))


@pytest.mark.slow
def test_bf16_matches_fp32_after_training(reference):
    """The same after 200 Adam steps of float32 training (weights far from their initialisation), but for z:
    the trained branches are large (|g(x)| up to half of |x|), so the 8-bit rounding of their inputs moves z by
    about 1% per image through the blocks (measured 1.1e-2 median, 1.3e-2 max; any one rounding site alone
    gives most of it), while bits/dim (8.7e-4) and the gradients (1.1e-2, cosine 0.99998) stay within the targets."""
    model = copy.deepcopy(reference)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(200):
        z, logdet = model(digits28(16, seed=100 + step))
        loss = bits_per_dim(z, logdet, (1, 28, 28), 256).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_lipschitz()
    compare(model, digits28(16, seed=3), z_rtol=3e-2)


def test_bf16_training_keeps_float32_weights_and_state(tmp_path, capsys):
    """A bf16 run's checkpoint holds float32 weights, EMA and optimiser state, and records its precision."""
    run_ok(TINY + ["--max-iters", "2", "--precision", "bf16", "--save", tmp_path / "b"], capsys)
    ckpt = torch.load(tmp_path / "b" / "models" / "most_recent.pth", weights_only=True)
    assert ckpt["config"]["precision"] == "bf16"
    for part in ("model", "ema"):
        assert all(v.dtype in (torch.float32, torch.float64, torch.int64) for v in ckpt[part].values()), part
    for st in ckpt["optimizer"]["state"].values():
        assert all(torch.as_tensor(v).dtype == torch.float32 for k, v in st.items() if k != "step")


def recon_error(path) -> float:
    model = load_model(str(path), ema=False)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, _ = model(x)
        return float((model.inverse(z) - x).abs().max())


def test_checkpoints_interchangeable_and_inversion_float32(tmp_path, capsys):
    """bf16 and fp32 runs from the same seed: each checkpoint resumes in the other precision (the flag changes
    on --resume, and stays as stored without it), evaluates in float32, and a bf16-trained model inverts in
    float32 as accurately as a float32-trained one."""
    seen = {}

    def hook(stage, trainer):
        seen[stage] = (trainer.cfg.precision, precision.current_dtype())

    paths = {}
    for prec in ("fp32", "bf16"):
        save = tmp_path / prec
        run_ok(TINY + ["--max-iters", "3", "--precision", prec, "--save", save], capsys)
        paths[prec] = save / "models" / "most_recent.pth"
    out = run_ok(["--resume", paths["bf16"], "--evaluate", "--nworkers", "0", "--seed", "0"], capsys)
    assert "test bits/dim" in out
    errors = {prec: recon_error(p) for prec, p in paths.items()}
    assert errors["bf16"] <= 1e-4 and errors["bf16"] <= 2 * errors["fp32"] + 1e-6, errors
    # Resume each in the other precision, then once more without the flag: the stored one is kept.
    for prec, other in (("fp32", "bf16"), ("bf16", "fp32")):
        argv = ["--resume", str(paths[prec]), "--max-iters", "4", "--precision", other, "--nworkers", "0"]
        assert train_img.run(argv, hook=hook) == 0
        assert seen["ready"] == (other, None)  # the branch dtype is set per training step only
        assert torch.load(paths[prec], weights_only=True)["config"]["precision"] == other
    assert train_img.run(["--resume", str(paths["fp32"]), "--max-iters", "5", "--nworkers", "0"], hook=hook) == 0
    assert seen["ready"][0] == "bf16"


@pytest.mark.parametrize("prec", ["tf32", "bf16"])
def test_training_precision_applies_to_the_step_only(tmp_path, monkeypatch, prec):
    """The training step runs in the chosen precision; validation (and sampling, reconstructions) in float32."""
    import resflows.trainer as trainer_module

    seen = {}
    real_loss, real_eval = trainer_module.compute_loss, trainer_module.evaluate

    def state():
        return precision.current_dtype(), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    def loss(*a, **k):
        seen.setdefault("train", state())
        return real_loss(*a, **k)

    def evaluate(*a, **k):
        seen.setdefault("eval", state())
        return real_eval(*a, **k)

    monkeypatch.setattr(trainer_module, "compute_loss", loss)
    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        train_img.run(TINY + ["--max-iters", "1", "--precision", prec, "--save", str(tmp_path / "r")],
                      hook=lambda stage, trainer: trainer.validate() if stage == "done" else None)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    on = prec == "tf32"
    assert seen["train"] == (BF16 if prec == "bf16" else None, on, on)
    assert seen["eval"] == (None, False, False)


def test_tf32_flag_is_an_alias():
    assert parse_args(["--tf32", "True"])[0].precision == "tf32"
    assert parse_args(["--tf32", "True", "--precision", "tf32"])[0].precision == "tf32"
    assert parse_args([])[0].precision == "fp32"
    assert "precision" in parse_args(["--tf32", "True"])[1]  # typed: it overrides a checkpoint's on --resume


def test_conflicting_tf32_and_precision_is_one_line(capsys):
    code, _, err = cli(["--tf32", "True", "--precision", "bf16"], capsys)
    assert code == 2 and "--tf32" in err and "--precision" in err and len(err.strip().splitlines()) == 1


def test_device_lines(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert "native bf16 instructions (avx512_bf16)" in runtime.check_precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: [])
    assert "without native bf16" in runtime.check_precision("bf16", torch.device("cpu"))
    assert "full float32" in runtime.check_precision("tf32", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ValueError, match="--precision bf16: Tesla V100 cannot compute in bfloat16"):
        runtime.check_precision("bf16", torch.device("cuda"))
    with pytest.raises(ValueError, match="--precision bf16"):
        runtime.check_precision("bf16", torch.device("mps"))


def test_train_toy_bf16(tmp_path, capsys):
    """train_toy.py --precision bf16 trains (float32 parameters), validates in float32 and records the flag."""
    argv = ["--nblocks", "2", "--dims", "16-16", "--niters", "3", "--batch_size", "64", "--test_batch_size", "100",
            "--val_freq", "3", "--viz_freq", "100", "--viz_npts", "16", "--log_freq", "1", "--precision", "bf16",
            "--save", tmp_path / "t"]
    run_ok(argv, capsys, train_toy.main)
    log = (tmp_path / "t" / "logs").read_text()
    assert "precision bf16" in log
    ckpt = torch.load(tmp_path / "t" / "last.pth", weights_only=True)
    assert ckpt["config"]["precision"] == "bf16"
    assert all(v.dtype != BF16 for v in ckpt["model"].values())
