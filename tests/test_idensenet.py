"""i-DenseNets through train_img.py's own flags: the fork's state_dict layouts, its command lines and
checkpoints, training with dense branches on digits (learning, exact resume, the K reset, EMA)."""
import argparse
import re
import sys
import types

import pytest
import torch

from resflows import exact_logdet, load_model, read_checkpoint
from resflows.cli import parse_args
from resflows.factory import model_config_from
from resflows.layers import LipschitzDenseLayer
from resflows.model import ResidualFlow
from tests.helpers import assert_same_training_state, cli, read_reference, run_ok

# The i-DenseNets reference files (produced by the fork's code) and the flags that built them.
REFERENCE_FLAGS = {
    "idensenet_cifar32_1-1_depth3_growth32_learnconcat.txt":
        "--data cifar10 --nblocks 1-1 --idim 32 --densenet True --densenet_depth 3 --densenet_growth 32 "
        "--fc_densenet_growth 16 --learnable_concat True --act CLipSwish",
    "idensenet_cifar32_1-1-1_depth2_growth16_factorout_hybrid.txt":
        "--data cifar10 --nblocks 1-1-1 --idim 32 --densenet True --densenet_depth 2 --densenet_growth 16 "
        "--fc_densenet_growth 16 --learnable_concat False --act CLipSwish --factor-out True --fc-end False --task hybrid",
}
# The fork's published CIFAR-10 command (README of its repository).
FORK_CIFAR10 = ("--data cifar10 --nblocks 16-16-16 --densenet True --learnable_concat True --start_learnable_concat 25 "
                "--act CLipSwish --densenet_depth 3 --densenet_growth 172 --save experiments/cifar10_idensenet")
# The input layer's mean/std buffers: the Normalize layer's own state, not the dense branches'.
NORMALIZE_KEYS = ("init_layer.", "transforms.0.chain.0.mean", "transforms.0.chain.0.std")

TINY_DENSE = ["--data", "digits", "--nblocks", "1-1", "--batchsize", "50", "--nworkers", "0", "--print-freq", "1",
              "--vis-freq", "1000", "--seed", "1", "--densenet", "True", "--densenet_depth", "2",
              "--densenet_growth", "8", "--fc_densenet_growth", "8", "--act", "CLipSwish"]


pytestmark = pytest.mark.usefixtures("offline", "one_thread")


def model_from_flags(flags: str) -> ResidualFlow:
    cfg, _ = parse_args(flags.split())
    return ResidualFlow(model_config_from(cfg))


def dense_layers(model):
    return [m for m in model.modules() if isinstance(m, LipschitzDenseLayer)]


# -- the fork's layouts and command lines --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REFERENCE_FLAGS))
def test_state_dict_matches_the_fork(reference_dir, name):
    model = model_from_flags(REFERENCE_FLAGS[name])
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    ref = read_reference(reference_dir / "state_dict" / name)
    if not any(k.startswith("init_layer.") for k, _, _ in ours):
        # Our Normalize input layer keeps mean/std as constants; the reference (fork and paper alike) registers
        # them as buffers. That layer is not part of the dense branches; everything else must match exactly.
        ref = [r for r in ref if not r[0].startswith(NORMALIZE_KEYS)]
    assert ours == ref
    learnable = "--learnable_concat True" in REFERENCE_FLAGS[name]
    params = dict(model.named_parameters())
    assert all((n + ".K1_unnormalized" in params) == learnable for n, m in model.named_modules() if isinstance(m, LipschitzDenseLayer))


def test_every_idensenet_reference_file_is_tested(reference_dir):
    assert sorted(p.name for p in (reference_dir / "state_dict").glob("idensenet_*.txt")) == sorted(REFERENCE_FLAGS)


def test_the_forks_published_command_parses_unchanged():
    cfg, _ = parse_args(FORK_CIFAR10.split())
    assert (cfg.densenet, cfg.learnable_concat, cfg.start_learnable_concat, cfg.densenet_depth, cfg.densenet_growth) == (
        True, True, 25, 3, 172)
    assert cfg.act == "clipswish" and cfg.lip_coeff == 0.98 and cfg.fc_densenet_growth == 32
    mc = model_config_from(cfg)
    assert mc.densenet and mc.densenet_growth == 172 and mc.act == "clipswish"


def test_dense_flags_are_off_by_default_so_the_papers_commands_are_unchanged():
    cfg, _ = parse_args(["--data", "cifar10"])
    assert cfg.densenet is False and not model_config_from(cfg).densenet
    assert parse_args(["--act", "LeakyLSwish"])[0].act == "leakylswish"
    assert parse_args(["--lip-coeff", "0.9"])[0].lip_coeff == 0.9


def test_dense_branch_shapes_follow_the_flags():
    """Width grows by the growth per dense layer; CLipSwish halves the conv's outputs, other activations do not;
    the fully connected blocks start at 64 features and grow by --fc_densenet_growth."""
    for act, conv_out in (("CLipSwish", 6), ("swish", 12)):
        model = model_from_flags(f"--data digits --nblocks 1-1 --densenet True --densenet_depth 2 --densenet_growth 12 "
                                 f"--fc_densenet_growth 4 --act {act}")
        sd = model.state_dict()
        assert sd["transforms.0.chain.2.nnet.0.network.0.weight"].shape == (conv_out, 1, 3, 3)
        assert sd["transforms.0.chain.2.nnet.1.network.0.weight"].shape == (conv_out, 13, 3, 3)
        assert sd["transforms.0.chain.2.nnet.2.weight"].shape == (1, 25, 1, 1)
        assert sd["transforms.1.chain.2.nnet.nnet.0.weight"].shape == (64, 64)
        assert sd["transforms.1.chain.2.nnet.nnet.3.weight"].shape == (64, 72)
        assert all(b.linearizable for b in model.iresblocks())


@pytest.mark.parametrize("extra", ["--act CLipSwish --batchnorm True", "--act LeakyLSwish --factor-out True --fc-end False",
                                   "--act swish --fc True --nblocks 1 --learnable_concat False"])
def test_whole_model_forward_inverse_and_exact_logdet(extra):
    """A dense model in float64 with exact per-block log-dets: log|det dz/dx| equals slogdet of the whole
    model's Jacobian, and the inverse recovers x."""
    torch.manual_seed(0)
    model = model_from_flags("--data digits --nblocks 1-1 --densenet True --densenet_depth 2 --densenet_growth 4 "
                             "--fc_densenet_growth 4 " + extra).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        model.train().transform(x)  # ActNorm initialisation
    model.eval()
    for blk in model.iresblocks():
        blk.brute_force = True
        blk.inverse_atol, blk.inverse_rtol = 1e-22, 0.0
    z, logdet = model(x[:2])
    z_ex, logdet_ex = exact_logdet(model, x[:2])
    assert torch.allclose(z, z_ex) and torch.allclose(logdet, logdet_ex, rtol=1e-8), (logdet, logdet_ex)
    assert torch.allclose(model.inverse(z), x[:2], atol=1e-8)


@pytest.mark.parametrize("argv,match", [
    (["--densenet_growth", "7"], "--densenet_growth must be even with --act CLipSwish"),
    (["--fc_densenet_growth", "5"], "--fc_densenet_growth must be even"),
    (["--densenet_depth", "0"], "expected a positive integer"),
    (["--block", "coupling"], "drop --block coupling"),
    (["--learn-p", "True"], "--learn-p is not available with --densenet True"),
    (["--dropout", "0.1"], "--dropout is not used by dense branches"),
    (["--lip-coeff", "0"], "--lip-coeff must be a finite number in (0, 1]"),
    (["--start_learnable_concat", "-1"], "expected a non-negative integer"),
    (["--act", "CLipswish"], "invalid choice: 'CLipswish'"),
])
def test_bad_dense_flags_end_in_one_line(tmp_path, capsys, argv, match):
    code, _, err = cli(TINY_DENSE + ["--max-iters", "1", "--save", tmp_path / "run"] + argv, capsys)
    assert code != 0 and match in err and err.count("\n") == 1 and "Traceback" not in err


# -- training ------------------------------------------------------------------------------------------------
def _logged_bpd(out):
    return [float(m) for m in re.findall(r"\| step \d+ \| bits/dim ([0-9.]+)", out)]


def test_training_learns_and_the_ema_follows(tmp_path, capsys):
    """20 steps on digits: training bits/dim falls; K is learned (--start_learnable_concat 0); the EMA copy
    holds its own averages of every parameter, K included."""
    out = run_ok(TINY_DENSE + ["--max-iters", "20", "--lr", "3e-3", "--warmup-iters", "5", "--start_learnable_concat", "0",
                               "--save", tmp_path / "run"], capsys)
    bpd = _logged_bpd(out)
    assert len(bpd) == 20
    assert sum(bpd[-4:]) / 4 < sum(bpd[:4]) / 4 - 0.15, bpd
    ckpt = torch.load(tmp_path / "run" / "models" / "most_recent.pth", weights_only=True)
    ks = [k for k in ckpt["model"] if k.endswith("_unnormalized")]
    assert len(ks) == 2 * 2 * (1 + 4 + 1)  # 2 K per dense layer, 2 layers per branch, 6 blocks
    assert all(not torch.equal(ckpt["model"][k], torch.ones(1)) for k in ks)
    for k in ks:  # the EMA moved a little from 1 towards the model's K (decay 0.999)
        e, m = float(ckpt["ema"][k]), float(ckpt["model"][k])
        assert e != 1.0 and min(1.0, m) <= e <= max(1.0, m)
    assert "dense concatenation eta1" not in out  # logged at the end of an epoch only


def test_fixed_concatenation_weights(tmp_path, capsys):
    """--learnable_concat False: K are buffers at 1, never optimised, and etas are both coeff / sqrt(2)."""
    run_ok(TINY_DENSE + ["--max-iters", "2", "--learnable_concat", "False", "--save", tmp_path / "run"], capsys)
    ckpt = torch.load(tmp_path / "run" / "models" / "most_recent.pth", weights_only=True)
    ks = [k for k in ckpt["model"] if k.endswith("_unnormalized")]
    assert ks and all(torch.equal(ckpt["model"][k], torch.ones(1)) for k in ks)
    model = load_model(str(tmp_path / "run" / "models" / "most_recent.pth"))
    assert not any(n.endswith("_unnormalized") for n, _ in model.named_parameters())
    n_params = len([p for p in model.parameters() if p.requires_grad])
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == n_params
    for e1, e2 in model.concatenation_weights().values():
        assert e1 == pytest.approx(0.98 / 2**0.5) and e2 == pytest.approx(0.98 / 2**0.5)


def test_k_reset_in_the_first_epochs_and_exact_resume(tmp_path, capsys):
    """Batches of 500 make 3 steps per epoch. With --start_learnable_concat 1, K stays at its initial value
    through epoch 0 (reset after every step) and is learned from epoch 1. 6 steps == 3 steps, stop, resume for
    3 more: same parameters, EMA and optimizer state."""
    args = TINY_DENSE + ["--batchsize", "500", "--nepochs", "10", "--seed", "5", "--warmup-iters", "2",
                         "--start_learnable_concat", "1"]
    run_ok(args + ["--max-iters", "6", "--save", tmp_path / "full"], capsys)
    run_ok(args + ["--max-iters", "3", "--save", tmp_path / "split"], capsys)
    half = torch.load(tmp_path / "split" / "models" / "most_recent.pth", weights_only=True)
    ks = [k for k in half["model"] if k.endswith("_unnormalized")]
    assert (half["epoch"], half["batch_in_epoch"]) == (0, 3) and ks
    for part in ("model", "ema"):
        assert all(torch.equal(half[part][k], torch.ones(1)) for k in ks), part
    out = run_ok(args + ["--max-iters", "6", "--resume", tmp_path / "split" / "models" / "most_recent.pth"], capsys)
    assert "dense concatenation eta1" in out
    full, split = assert_same_training_state(tmp_path / "full" / "models" / "most_recent.pth",
                                             tmp_path / "split" / "models" / "most_recent.pth")
    assert full["step"] == split["step"] == 6
    assert not all(torch.equal(full["model"][k], torch.ones(1)) for k in ks)  # learned in epoch 1


# -- the fork's checkpoints --------------------------------------------------------------------------------
def _fork_checkpoint(path, flags):
    """A checkpoint in the fork's format: a pickle naming lib.* classes (its EMA object holds the averaged
    parameters and a pickled copy of the model), an argparse.Namespace of its flags, the state_dict.
    ``data='digits'`` (ours) lets it be evaluated offline; the other flags are the fork's."""
    torch.manual_seed(0)
    model = model_from_flags(flags)
    with torch.no_grad():
        model.train().transform(torch.rand(16, *model.config.input_size))  # ActNorm initialisation, as after training
        for name, p in model.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    shadow = {n: p.detach() + 0.001 * torch.randn_like(p) for n, p in model.named_parameters()}
    cfg, _ = parse_args(flags.split())
    args = argparse.Namespace(**{**cfg.to_dict(), "act": "CLipSwish", "densenet": True})
    names = ("lib", "lib.utils", "lib.resflow", "lib.layers", "lib.layers.dense_layer")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)

        def fake(module, name):
            cls = type(name, (), {"__module__": module, "__qualname__": name})
            setattr(sys.modules[module], name, cls)
            return cls

        ema = fake("lib.utils", "ExponentialMovingAverage")()
        dense = fake("lib.layers.dense_layer", "LipschitzDenseLayer")()
        dense.K1_unnormalized = torch.ones(1)
        flow = fake("lib.resflow", "ResidualFlow")()
        flow.transforms = [dense]
        ema.module, ema.decay, ema.shadow_params, ema.nparams = flow, 0.999, shadow, len(shadow)
        torch.save({"args": args, "state_dict": model.state_dict(), "optimizer_state_dict": None, "ema": ema,
                    "test_bpd": 3.5}, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return model, shadow


def test_fork_checkpoints_load_with_the_restricted_reader(tmp_path):
    path = tmp_path / "fork.pth"
    flags = "--data digits --nblocks 1-1 --densenet True --densenet_depth 2 --densenet_growth 8 --fc_densenet_growth 8 --act CLipSwish"
    model, shadow = _fork_checkpoint(path, flags)
    assert "lib" not in sys.modules
    ckpt = read_checkpoint(str(path))
    assert ckpt["format"] == "paper" and ckpt["config"]["densenet"] and ckpt["model_config"]["act"] == "clipswish"
    loaded = load_model(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ema = load_model(str(path), ema=True)
    for k, v in shadow.items():
        assert torch.equal(ema.state_dict()[k], v), k
    assert "lib" not in sys.modules  # nothing named by the file was imported


def test_fork_checkpoints_evaluate_sample_and_resume(tmp_path, capsys):
    path = tmp_path / "fork.pth"
    flags = "--data digits --nblocks 1-1 --densenet True --densenet_depth 2 --densenet_growth 8 --fc_densenet_growth 8 --act CLipSwish"
    _fork_checkpoint(path, flags)
    out = run_ok(["--resume", path, "--evaluate", "--sample", "4", "--save", tmp_path / "eval", "--seed", "0",
                  "--nworkers", "0"], capsys)
    assert "test bits/dim:" in out and "wrote 4 samples" in out
    out = run_ok(["--resume", path, "--max-iters", "2", "--save", tmp_path / "more", "--nworkers", "0",
                  "--batchsize", "50", "--print-freq", "1"], capsys)
    assert "step 2" in out
    code, _, err = cli(["--resume", path, "--evaluate", "--densenet_growth", "16", "--save", tmp_path / "e"], capsys)
    assert code == 1 and "--densenet_growth 16 (checkpoint: 8) conflicts" in err
