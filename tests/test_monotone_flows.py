"""Monotone Flows through train_img.py's own flags: the fork's command lines and state_dict layout, bad
combinations, training on digits (learning, exact resume, evaluation), --save-freq, --clip_grad_norm, and the
fork's checkpoints (lib.* pickles with begin_epoch / begin_iter) through the guarded reader."""
import argparse
import re
import sys
import types

import pytest
import torch

import train_toy
from resflows import load_model, read_checkpoint
from resflows.cli import parse_args
from resflows.factory import model_config_from
from resflows.layers import iResBlock
from resflows.layers.monotone import MonotoneBlock
from resflows.model import ResidualFlow
from tests.helpers import assert_same_training_state, cli, run_ok

# The fork's CIFAR-10 command (its README), minus --distributed (torchrun here).
FORK_CIFAR10 = ("--data cifar10 --nblocks 16-16-16 --batchsize 64 --densenet True --learnable_concat True --start_learnable_concat 25 "
                "--act CPila --densenet_depth 3 --densenet_growth 172 --monotone_resolvent True --n-exact-terms 10 "
                "--save experiments/cifar10_mf")
# Its CIFAR-10 flags scaled down to the bundled digits.
TINY_MF = ["--data", "digits", "--nblocks", "1-1", "--batchsize", "50", "--nworkers", "0", "--print-freq", "1",
           "--vis-freq", "1000", "--seed", "1", "--densenet", "True", "--monotone_resolvent", "True", "--act", "CPila",
           "--densenet_depth", "2", "--densenet_growth", "16", "--fc_densenet_growth", "8", "--learnable_concat", "True",
           "--n-exact-terms", "10"]

pytestmark = pytest.mark.usefixtures("offline", "one_thread")


def meta_model(flags: str) -> ResidualFlow:
    cfg, _ = parse_args(flags.split())
    with torch.device("meta"):
        return ResidualFlow(model_config_from(cfg))


# -- command lines and layout ---------------------------------------------------------------------------------
def test_the_forks_command_parses_and_builds_monotone_blocks():
    cfg, _ = parse_args(FORK_CIFAR10.split())
    assert cfg.monotone_resolvent and cfg.act == "cpila" and cfg.clip_grad_norm and cfg.save_freq == 0
    model = meta_model(FORK_CIFAR10)
    blocks = model.iresblocks()
    assert len(blocks) == 16 * 3 + 4 and all(type(b) is MonotoneBlock for b in blocks)
    assert all(b.n_exact_terms == 10 and b.neumann_grad and b.grad_in_forward for b in blocks)
    assert all(b.linearizable for b in blocks)  # the default path runs on the hand-written linearisation
    off, _ = parse_args(["--data", "cifar10"])
    assert not off.monotone_resolvent and type(meta_model("--data digits --nblocks 1-1").iresblocks()[0]) is iResBlock


def _shapes(sd, prefix):
    return [(k[len(prefix):], tuple(v.shape)) for k, v in sd.items() if k.startswith(prefix)]


def test_key_layout_of_the_forks_cifar10_model():
    """The layout of a Monotone Flows CIFAR-10 model (the fork's keys): block / ActNorm positions per scale, one conv
    block's and one fc block's keys and shapes; the monotone flag and CPila add no keys (same list as CLipSwish
    without its LipSwish slopes, same as residual blocks)."""
    sd = meta_model(FORK_CIFAR10).state_dict()
    conv = [(k, s) for k, s in _shapes(sd, "transforms.0.chain.2.") if not k.endswith((".u", ".v"))]
    expected = [("geom_p", ()), ("lamb", ()), ("last_n_samples", (1,)), ("last_firmom", (1,)), ("last_secmom", (1,))]
    for i in range(3):
        expected += [(f"nnet.{i}.K1_unnormalized", (1,)), (f"nnet.{i}.K2_unnormalized", (1,)),
                     (f"nnet.{i}.network.0.weight", (86, 3 + 172 * i, 3, 3)), (f"nnet.{i}.network.0.bias", (86,)),
                     (f"nnet.{i}.network.0.initialized", ()), (f"nnet.{i}.network.0.spatial_dims", (2,)),
                     (f"nnet.{i}.network.0.scale", ())]
    expected += [("nnet.3.weight", (3, 519, 1, 1)), ("nnet.3.bias", (3,)), ("nnet.3.initialized", ()),
                 ("nnet.3.spatial_dims", (2,)), ("nnet.3.scale", ())]
    assert conv == expected
    fc = _shapes(sd, "transforms.2.chain.32.")
    assert fc[:5] == expected[:5]
    assert ("nnet.nnet.0.weight", (64, 3072)) in fc and ("nnet.nnet.4.weight", (3072, 160)) in fc
    assert [s for k, s in fc if k.endswith("network.0.weight")] == [(16, 64), (16, 96), (16, 128)]
    assert not any(k.endswith(("initialized", "spatial_dims")) for k, _ in fc if k.startswith("nnet.nnet.0."))
    for scale, n_chain, blocks, actnorms in ((0, 35, range(2, 33, 2), [1] + list(range(3, 34, 2))),
                                             (1, 33, range(0, 31, 2), range(1, 32, 2)),
                                             (2, 40, list(range(0, 31, 2)) + [32, 34, 36, 38], range(1, 40, 2))):
        chain = {int(k.split(".")[3]) for k in sd if k.startswith(f"transforms.{scale}.chain.")}
        assert {j for j in chain if f"transforms.{scale}.chain.{j}.geom_p" in sd} == set(blocks)
        an = {j for j in chain if f"transforms.{scale}.chain.{j}.weight" in sd or f"transforms.{scale}.chain.{j}.fc_module.weight" in sd}
        assert an == set(actnorms) and max(chain) < n_chain
    assert sd["transforms.2.chain.33.fc_module.weight"].shape == (3072,)
    n_params = sum(p.numel() for p in meta_model(FORK_CIFAR10).parameters() if p.requires_grad)
    assert n_params == 24_894_430  # the fork's count for this command, computed from its module definitions
    clipswish = meta_model(FORK_CIFAR10.replace("CPila", "CLipSwish")).state_dict()
    assert [(k, v.shape) for k, v in clipswish.items() if not k.endswith("swish.beta")] == [(k, v.shape) for k, v in sd.items()]
    residual = meta_model(FORK_CIFAR10.replace("--monotone_resolvent True", "")).state_dict()
    assert [(k, v.shape) for k, v in residual.items()] == [(k, v.shape) for k, v in sd.items()]


@pytest.mark.parametrize("argv,match", [
    (["--block", "coupling", "--densenet", "False"], "--monotone_resolvent True turns residual blocks into monotone blocks; "
                                                     "drop --block coupling"),
    (["--densenet", "False", "--dropout", "0.1"], "--dropout is not available with --monotone_resolvent True"),
    (["--batchnorm", "True"], "--batchnorm is not available with --monotone_resolvent True"),
    (["--densenet_growth", "15"], "--densenet_growth must be even with --act CPila"),
    (["--save-freq", "3", "--update-freq", "2"], "--save-freq 3 must be a multiple of --update-freq 2"),
    (["--clip_grad_norm", "maybe"], "--clip_grad_norm: expected True or False"),
    (["--monotone_resolvent", "yes"], "--monotone_resolvent: expected True or False"),
])
def test_bad_combinations_end_in_one_line_at_parse_time(tmp_path, capsys, argv, match):
    code, _, err = cli(TINY_MF + ["--max-iters", "1", "--save", tmp_path / "run"] + argv, capsys)
    # (the growth rule is the model's, which needs only the flags: checked when parsing too)
    assert code == 2 and match in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_toy_flags(tmp_path, capsys):
    code, _, err = cli(["--arch", "realnvp", "--monotone_resolvent", "True", "--save", tmp_path / "t"], capsys, train_toy.main)
    assert code == 2 and "use --arch iresnet" in err and err.count("\n") == 1
    out = run_ok(["--data", "8gaussians", "--monotone_resolvent", "True", "--act", "CPila", "--dims", "8-8", "--nblocks", "1",
                  "--niters", "2", "--batch_size", "32", "--test_batch_size", "64", "--viz_freq", "1000", "--val_freq", "2",
                  "--brute-force", "True", "--save", tmp_path / "toy"], capsys, train_toy.main)
    assert "finished at iteration 2" in out
    from resflows.toy import load_toy_model

    model = load_toy_model(str(tmp_path / "toy" / "checkpt.pth"))
    assert all(type(b) is MonotoneBlock for b in model.iresblocks())


# -- training ----------------------------------------------------------------------------------------------------
def _logged_bpd(out):
    return [float(m) for m in re.findall(r"\| step \d+ \| bits/dim ([0-9.]+)", out)]


MF_RUN = TINY_MF + ["--batchsize", "500", "--nepochs", "10", "--seed", "5", "--warmup-iters", "2", "--start_learnable_concat", "0",
                    "--lr", "5e-3"]


@pytest.mark.slow
def test_training_learns(tmp_path, capsys):
    """Bits/dim falls over 12 steps (batches of 500) at a high learning rate."""
    bpd = _logged_bpd(run_ok(MF_RUN + ["--max-iters", "12", "--save", tmp_path / "long"], capsys))
    assert len(bpd) == 12 and sum(bpd[-3:]) / 3 < sum(bpd[:3]) / 3 - 0.1, bpd


def test_training_resumes_exactly_and_evaluates(tmp_path, capsys):
    """Batches of 500 make 3 steps per epoch: 6 steps equal 3 steps, stop, and 3 more after --resume (parameters, EMA
    and optimiser state bitwise); the checkpoint evaluates, and its EMA model inverts."""
    run_ok(MF_RUN + ["--max-iters", "6", "--save", tmp_path / "full"], capsys)
    run_ok(MF_RUN + ["--max-iters", "3", "--save", tmp_path / "split"], capsys)
    run_ok(MF_RUN + ["--max-iters", "6", "--resume", tmp_path / "split" / "models" / "most_recent.pth"], capsys)
    full, split = assert_same_training_state(tmp_path / "full" / "models" / "most_recent.pth",
                                             tmp_path / "split" / "models" / "most_recent.pth")
    assert full["step"] == split["step"] == 6 and full["config"]["monotone_resolvent"]
    out = run_ok(["--resume", tmp_path / "full" / "models" / "most_recent.pth", "--evaluate", "--seed", "0", "--nworkers", "0",
                  "--val-batchsize", "500"], capsys)
    assert "test bits/dim:" in out
    model = load_model(str(tmp_path / "full" / "models" / "most_recent.pth"), ema=True)
    assert all(type(b) is MonotoneBlock for b in model.iresblocks())
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.inverse(model.transform(x)), x, atol=1e-4)


def test_save_freq_and_no_clipping(tmp_path, capsys):
    out = run_ok(TINY_MF + ["--max-iters", "2", "--save-freq", "2", "--clip_grad_norm", "False", "--lr", "1.0",
                            "--save", tmp_path / "run"], capsys)
    intra = torch.load(tmp_path / "run" / "models" / "most_recent_intraepoch.pth", weights_only=True)
    assert intra["step"] == 2 and intra["itr"] == 2 and not intra["config"]["clip_grad_norm"]
    norms = [float(m) for m in re.findall(r"grad norm ([0-9.]+)", out)]
    assert norms  # logged whether clipped or not


# -- the fork's checkpoints ----------------------------------------------------------------------------------------
def _fork_checkpoint(path, flags, begin_epoch, begin_iter):
    """A checkpoint in the fork's format: a pickle naming lib.* classes (an EMA object holding the averaged parameters
    and the pickled model with its CPila activations), a Namespace of its flags (no begin_epoch flag), the counters."""
    torch.manual_seed(0)
    cfg, _ = parse_args(flags.split())
    model = ResidualFlow(model_config_from(cfg))
    with torch.no_grad():
        model.train().transform(torch.rand(16, *model.config.input_size))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    shadow = {n: p.detach() + 0.001 * torch.randn_like(p) for n, p in model.named_parameters()}
    saved_args = {k: v for k, v in cfg.to_dict().items() if k != "begin_epoch"}
    args = argparse.Namespace(**{**saved_args, "act": "CPila", "distributed": False, "var_deq": False})
    names = ("lib", "lib.utils", "lib.resflow", "lib.layers", "lib.layers.base", "lib.layers.base.pila",
             "lib.layers.extended_sequential", "lib.layers.iresblock")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            sys.modules[n] = types.ModuleType(n)

        def fake(module, name):
            cls = type(name, (), {"__module__": module, "__qualname__": name})
            setattr(sys.modules[module], name, cls)
            return cls

        ema = fake("lib.utils", "ExponentialMovingAverage")()
        seq = fake("lib.layers.extended_sequential", "ExtendedSequential")()
        seq.act = fake("lib.layers.base.pila", "CPila")()
        block = fake("lib.layers.iresblock", "iResBlock")()
        block.nnet, block.monotone_resolvent = seq, True
        flow = fake("lib.resflow", "ResidualFlow")()
        flow.transforms = [block]
        ema.module, ema.decay, ema.shadow_params, ema.nparams = flow, 0.999, shadow, len(shadow)
        torch.save({"args": args, "state_dict": model.state_dict(), "optimizer_state_dict": None, "ema": ema,
                    "test_bpd": 3.5, "begin_epoch": begin_epoch, "begin_iter": begin_iter}, path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return model, shadow


def test_fork_checkpoints_load_evaluate_sample_and_resume(tmp_path, capsys):
    path = tmp_path / "mf.pth"
    flags = ("--data digits --nblocks 1-1 --densenet True --monotone_resolvent True --act CPila --densenet_depth 2 "
             "--densenet_growth 16 --fc_densenet_growth 8 --n-exact-terms 10")
    model, shadow = _fork_checkpoint(path, flags, begin_epoch=2, begin_iter=61)
    assert "lib" not in sys.modules
    ckpt = read_checkpoint(str(path))
    assert ckpt["format"] == "paper" and ckpt["config"]["monotone_resolvent"] and ckpt["model_config"]["act"] == "cpila"
    assert (ckpt["epoch"], ckpt["itr"]) == (2, 61)
    loaded = load_model(str(path))
    assert all(type(b) is MonotoneBlock for b in loaded.iresblocks())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ema = load_model(str(path), ema=True)
    for k, v in shadow.items():
        assert torch.equal(ema.state_dict()[k], v), k
    out = run_ok(["--resume", path, "--evaluate", "--sample", "4", "--save", tmp_path / "eval", "--seed", "0",
                  "--nworkers", "0", "--val-batchsize", "500"], capsys)
    assert "test bits/dim:" in out and "wrote 4 samples" in out
    out = run_ok(["--resume", path, "--max-iters", "63", "--save", tmp_path / "more", "--nworkers", "0",
                  "--batchsize", "50", "--print-freq", "1"], capsys)
    assert "epoch 2 | iter 62 | step 62" in out and "step 63" in out  # counters continue from begin_epoch / begin_iter
    assert "lib" not in sys.modules
