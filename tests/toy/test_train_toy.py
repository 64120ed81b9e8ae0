"""train_toy.py end to end: it learns, writes what it promises, runs every estimator option, fails cleanly."""
import functools
import math
import os
import signal

import pytest
import torch
from PIL import Image

import train_toy
from resflows.losses import standard_normal_logprob
from resflows.toy import ToyTrainer, build_toy_model, load_toy_model
from resflows.toy.cli import parse_args
from resflows.toy.viz import FIGURE_PIXELS, log_density
from tests import helpers

TINY = ["--nblocks", "2", "--dims", "8-8", "--batch_size", "32", "--test_batch_size", "64", "--viz_npts", "16",
        "--log_freq", "1"]


cli = functools.partial(helpers.cli, main=train_toy.main)


def test_defaults_are_the_paper_toy_scripts():
    cfg = parse_args([])
    expected = dict(data="pinwheel", arch="iresnet", coeff=0.9, vnorms=(2.0,) * 6, n_lipschitz_iters=5, atol=None,
                    rtol=None, learn_p=False, mixed=True, dims=(128, 128, 128, 128), act="swish", nblocks=100,
                    brute_force=False, actnorm=False, batchnorm=False, exact_trace=False, n_power_series=None,
                    n_samples=1, n_dist="geometric", niters=50000, batch_size=500, test_batch_size=10000, lr=1e-3,
                    weight_decay=1e-5, annealing_iters=0, save="experiments/iresnet_toy", viz_freq=100,
                    val_freq=100, log_freq=10, gpu=0, seed=0)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert parse_args(["--learn-p", "true", "--mixed", "0", "--atol", "1e-4", "--n-power-series", "None"]).mixed is False


def test_learns_8gaussians(tmp_path):
    argv = ["--data", "8gaussians", "--nblocks", "4", "--dims", "64-64", "--niters", "200", "--batch_size", "256",
            "--test_batch_size", "2000", "--lr", "5e-3", "--val_freq", "50", "--viz_freq", "200", "--viz_npts", "60",
            "--log_freq", "50", "--save", str(tmp_path / "run")]
    trainer = train_toy.run(argv)
    cfg = trainer.cfg
    # The same initial model, rebuilt from the seed, scored on the same fixed test set.
    torch.manual_seed(cfg.seed)
    initial = build_toy_model(cfg).eval()
    start = float(-log_density(initial, trainer.test_x).mean())
    gaussian = float(-standard_normal_logprob(trainer.test_x).sum(1).mean())  # N(0, I) on the test set, exactly
    final = trainer.history["test_loss"][-1][1]
    assert abs(start - gaussian) < 0.2  # near-identity initialisation
    assert final < start - 1.5 and final < gaussian - 1.5, (start, gaussian, trainer.history["test_loss"])
    # Outputs: logs, TensorBoard, figures of the documented size, a safe checkpoint that reproduces the test loss.
    save = tmp_path / "run"
    assert "[TEST] Iter 0200" in (save / "logs").read_text()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(save / "tb"))
    assert sorted(os.listdir(save / "figs")) == ["0001.png", "0200.png"]
    with Image.open(save / "figs" / "0200.png") as im:
        assert im.format == "PNG" and im.size == FIGURE_PIXELS == (900, 300)
    ckpt = torch.load(save / "checkpt.pth", weights_only=True)
    assert ckpt["itr"] == 200 and ckpt["best_test_loss"] == pytest.approx(final)
    assert ckpt["config"]["dims"] == [64, 64] and "state" in ckpt["optimizer"]
    model = load_toy_model(str(save / "checkpt.pth"))
    assert float(-log_density(model, trainer.test_x).mean()) == pytest.approx(final, abs=1e-5)


def test_realnvp_trains(tmp_path, capsys):
    trainer = train_toy.run(["--arch", "realnvp", "--data", "8gaussians", "--nblocks", "2", "--dims", "32-32",
                             "--niters", "100", "--batch_size", "256", "--test_batch_size", "1000", "--lr", "5e-3",
                             "--val_freq", "10", "--viz_freq", "100", "--viz_npts", "32", "--save", str(tmp_path / "nvp")])
    losses = [v for _, v in trainer.history["test_loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    assert (tmp_path / "nvp" / "figs" / "0100.png").exists()


@pytest.mark.parametrize("extra", [
    ["--brute-force", "True"],
    ["--exact-trace", "True", "--n-power-series", "3"],
    ["--n-power-series", "4"],
    ["--n-samples", "3"],
    ["--n-dist", "poisson"],
    ["--learn-p", "True"],
    ["--learn-p", "True", "--mixed", "False"],
    ["--actnorm", "True"],
    ["--batchnorm", "True"],
    ["--mixed", "False", "--vnorms", "3f3f"],
    ["--vnorms", "2f22", "--n-lipschitz-iters", "None", "--atol", "1e-4", "--rtol", "1e-4"],
    ["--act", "fullsort"],
    ["--act", "maxmin"],
    ["--act", "lcube", "--annealing-iters", "10"],
    ["--act", "selu"],
    ["--arch", "realnvp", "--actnorm", "True", "--batchnorm", "True", "--act", "relu"],
])
def test_one_step_with_each_option(tmp_path, capsys, extra):
    code, out, err = cli(TINY + ["--niters", "1", "--save", tmp_path / "r"] + extra, capsys)
    assert code == 0, err
    assert "Iter 0001" in out and "[TEST] Iter 0001" in out
    ckpt = torch.load(tmp_path / "r" / "checkpt.pth", weights_only=True)
    assert ckpt["itr"] == 1 and math.isfinite(ckpt["best_test_loss"])
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())


def test_signal_saves_and_stops(tmp_path, capsys, monkeypatch):
    step = ToyTrainer.run_step

    def step_then_signal(self):
        out = step(self)
        if self.itr == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ToyTrainer, "run_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = cli(TINY + ["--niters", "1000", "--save", tmp_path / "s"], capsys)
    assert code == 0, err
    assert "received SIGTERM" in out
    assert torch.load(tmp_path / "s" / "last.pth", weights_only=True)["itr"] == 3
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


@pytest.mark.parametrize("argv", [
    ["--data", "spiral"],
    ["--learn-p", "maybe"],
    ["--arch", "glow"],
    ["--nblocks", "x"],
    ["--unknown-flag", "1"],
    ["--dims", "8-x"],
    ["--vnorms", "22"],
    ["--act", "maxmin", "--dims", "7"],
    ["--coeff", "1.2"],
    ["--niters", "0"],
])
def test_bad_flags_give_one_line(tmp_path, capsys, argv):
    code, out, err = cli(argv + ["--save", tmp_path / "bad"], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_toy.py: error:"), err
    assert "Traceback" not in err


def test_save_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = cli(TINY + ["--niters", "1", "--save", f], capsys)
    assert code == 1 and "is a file" in err
