"""train_img.py end to end on the bundled digits: tasks, options, resume, signals, evaluation, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from resflows import read_checkpoint
from tests.conftest import REPO
from tests.helpers import TINY, assert_same_training_state, cli, run_ok

pytestmark = pytest.mark.usefixtures("offline")


# -- short runs of every task and option ------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    [],
    ["--task", "classification"],
    ["--task", "hybrid"],
    ["--task", "hybrid", "--scale-dim", "True"],
    ["--block", "coupling"],
    ["--factor-out", "True", "--fc-end", "False"],
    ["--squeeze-first", "True", "--nblocks", "1", "--imagesize", "16"],
    ["--padding", "1"],
    ["--padding", "2", "--padding-dist", "gaussian"],
    ["--optimizer", "adamax", "--wd", "1e-4"],
    ["--optimizer", "rmsprop", "--wd", "1e-4"],
    ["--optimizer", "sgd", "--wd", "1e-4", "--scheduler", "True"],
    ["--scheduler", "True", "--update-freq", "2", "--annealing-iters", "5"],
    ["--neumann-grad", "False", "--mem-eff", "False", "--n-power-series", "3"],
    ["--quadratic", "True", "--batchnorm", "True", "--fc-actnorm", "True", "--dropout", "0.1"],
    ["--learn-p", "True", "--act", "elu"],
])
def test_short_runs(tmp_path, capsys, extra):
    out = run_ok(TINY + ["--max-iters", "3", "--save", tmp_path / "run"] + extra, capsys)
    assert "step 3" in out
    ckpt = torch.load(tmp_path / "run" / "models" / "most_recent.pth", weights_only=True)
    assert ckpt["step"] == 3
    for k, v in ckpt["model"].items():
        assert torch.isfinite(v.float()).all(), k


def test_full_epoch_validates_logs_and_visualises(tmp_path, capsys):
    save = tmp_path / "run"
    out = run_ok(TINY + ["--batchsize", "500", "--nepochs", "2", "--vis-freq", "2", "--save", save], capsys)
    assert "epoch 0 | test bits/dim" in out and "epoch 1 | test bits/dim" in out
    assert "Lipschitz constants" in out
    assert sorted(os.listdir(save / "models")) == ["checkpt-0000.pth", "checkpt-0001.pth", "most_recent.pth"]
    assert "test bits/dim" in (save / "logs").read_text()
    assert os.listdir(save / "tb") and len(os.listdir(save / "imgs")) == 3
    ckpt = read_checkpoint(str(save / "models" / "most_recent.pth"))
    assert ckpt["epoch"] == 2 and ckpt["last_test_bpd"] is not None and ckpt["ema"] is not None


def test_only_the_best_five_checkpoints_are_kept(tmp_path, capsys):
    save = tmp_path / "run"
    run_ok(TINY + ["--batchsize", "750", "--nepochs", "7", "--save", save, "--lr", "3e-3", "--warmup-iters", "1"], capsys)
    names = sorted(os.listdir(save / "models"))
    assert "most_recent.pth" in names and len(names) == 6
    ckpt = read_checkpoint(str(save / "models" / "most_recent.pth"))
    kept = sorted(int(n[8:12]) for n in names if n.startswith("checkpt"))
    assert kept == sorted(e for _, e, _ in ckpt["best"])


# -- resume ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_equals_uninterrupted_training(tmp_path, capsys, workers):
    """2N steps == N steps, stop, resume for N more: same parameters, EMA and optimizer state (CPU, fixed
    seed). Batches of 500 make the runs cross epoch boundaries, with validation in between; with DataLoader
    workers every epoch must still get its own dequantisation noise."""
    args = TINY + ["--batchsize", "500", "--nepochs", "10", "--seed", "5", "--scheduler", "True", "--warmup-iters", "2",
                   "--nworkers", workers]
    run_ok(args + ["--max-iters", "8", "--save", tmp_path / "full"], capsys)
    run_ok(args + ["--max-iters", "4", "--save", tmp_path / "split"], capsys)
    run_ok(args + ["--max-iters", "8", "--resume", tmp_path / "split" / "models" / "most_recent.pth"], capsys)
    full, split = assert_same_training_state(tmp_path / "full" / "models" / "most_recent.pth",
                                             tmp_path / "split" / "models" / "most_recent.pth")
    assert full["step"] == split["step"] == 8 and full["epoch"] == split["epoch"]


def test_resume_takes_typed_optimizer_flags(tmp_path, capsys):
    run_ok(TINY + ["--max-iters", "2", "--save", tmp_path / "run"], capsys)
    ckpt = tmp_path / "run" / "models" / "most_recent.pth"
    run_ok(["--resume", ckpt, "--max-iters", "3", "--wd", "0.1", "--nworkers", "0"], capsys)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 3 and saved["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    out = run_ok(["--resume", ckpt, "--max-iters", "4", "--optimizer", "sgd", "--nworkers", "0"], capsys)
    assert "starting the optimizer afresh" in out
    assert torch.load(ckpt, weights_only=True)["step"] == 4


def test_classification_heads_are_initialised_before_the_ema_copy(tmp_path, capsys):
    run_ok(TINY + ["--max-iters", "1", "--task", "hybrid", "--save", tmp_path / "run"], capsys)
    ckpt = torch.load(tmp_path / "run" / "models" / "most_recent.pth", weights_only=True)
    key = "classification_heads.0.1.bias"
    assert int(ckpt["ema"]["classification_heads.0.1.initialized"]) == 1
    assert torch.allclose(ckpt["ema"][key], ckpt["model"][key], atol=1e-2) and ckpt["ema"][key].abs().sum() > 0


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    save = tmp_path / "run"
    env = {**os.environ, "RESFLOWS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train_img.py")] + TINY + ["--batchsize", "32", "--save", str(save)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "step 2 " in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in out and "Traceback" not in err
    ckpt = read_checkpoint(str(save / "models" / "most_recent.pth"))
    assert ckpt["step"] >= 2


def test_non_finite_losses_stop_the_run_without_a_bad_checkpoint(tmp_path, capsys, monkeypatch):
    import resflows.trainer as tr

    real = tr.compute_loss

    def nan_loss(*a, **k):
        out = real(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tr, "compute_loss", nan_loss)
    code, out, err = cli(TINY + ["--max-iters", "20", "--save", tmp_path / "run"], capsys)
    assert code == 1 and "non-finite for 5 steps in a row" in err and "\n" == err[-1] and err.count("\n") == 1
    assert "step skipped" in out
    assert not (tmp_path / "run" / "models" / "most_recent.pth").exists()


# -- evaluation and sampling -----------------------------------------------------------------------------
def _write_mnist_format(root):
    """scikit-learn's digits in MNIST's idx format at 28x28 (bilinear), as the reference checkpoint was trained."""
    import struct

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.stack([np.asarray(Image.fromarray(np.clip(np.round(im * 255.0 / 16.0), 0, 255).astype(np.uint8))
                                .resize((28, 28), Image.BILINEAR)) for im in d.images])
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, arr, magic in (("train-images-idx3-ubyte", imgs[:1500], 2051), ("t10k-images-idx3-ubyte", imgs[1500:], 2051),
                             ("train-labels-idx1-ubyte", d.target[:1500].astype(np.uint8), 2049),
                             ("t10k-labels-idx1-ubyte", d.target[1500:].astype(np.uint8), 2049)):
        with open(raw / name, "wb") as f:
            f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes())


def test_evaluate_the_paper_checkpoint(tmp_path, capsys, reference_dir):
    _write_mnist_format(tmp_path / "data")
    out = run_ok(["--resume", reference_dir / "legacy" / "checkpoint.pth", "--evaluate", "--dataroot", tmp_path / "data",
                  "--save", tmp_path / "eval", "--seed", "0", "--nworkers", "0"], capsys)
    line = [ln for ln in out.splitlines() if ln.startswith("test bits/dim:")][0]
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(res) >= {"test_bpd", "test_bpd_stderr", "n_images", "checkpoint", "ema"}
    assert res["n_images"] == 297 and res["ema"] is True
    assert f"{res['test_bpd']:.4f} +- {res['test_bpd_stderr']:.4f} (297 images)" in line
    # The paper's code logged 6.1703 for this checkpoint on the same images.
    assert abs(res["test_bpd"] - 6.1703) < 3 * res["test_bpd_stderr"]
    # --seed makes the stochastic estimate repeatable.
    run_ok(["--resume", reference_dir / "legacy" / "checkpoint.pth", "--evaluate", "--dataroot", tmp_path / "data",
            "--save", tmp_path / "eval2", "--seed", "0", "--nworkers", "0"], capsys)
    assert json.loads((tmp_path / "eval2" / "eval.json").read_text())["test_bpd"] == res["test_bpd"]


def test_sample_grid(tmp_path, capsys):
    run_ok(TINY + ["--max-iters", "2", "--save", tmp_path / "run"], capsys)
    out = run_ok(["--resume", tmp_path / "run" / "models" / "most_recent.pth", "--sample", "12", "--nrow", "4",
                  "--temp", "0.7"], capsys)
    path = out.strip().splitlines()[-1].split(" to ")[-1]
    assert path.startswith(str(tmp_path / "run" / "samples"))
    from PIL import Image

    img = Image.open(path)
    # 4 x 3 grid of 8x8 images with 2-pixel padding, enlarged by nearest neighbour until the rows are at least
    # 512 pixels wide (x16: 4 x 128 = 512)
    assert img.size == (4 * 128 + 5 * 32, 3 * 128 + 4 * 32)


# -- bad input: one line, non-zero exit, no traceback --------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--data", "imagenet1k"], "invalid choice: 'imagenet1k'"),
    (["--nblocks", "16-x"], "--nblocks must be positive integers"),
    (["--kernels", "3-a"], "--kernels must be positive integers"),
    (["--vnorms", "22z"], "--vnorms takes one norm order"),
    (["--vnorms", "222"], "needs one more order than --kernels"),
    (["--nblocks", "1-1-1"], "allows at most 2"),
    (["--batchsize", "5000"], "larger than the training set"),
    (["--batchsize", "0"], "expected a positive integer"),
    (["--save", ""], "--save is empty"),
    (["--actnorm", "maybe"], "expected True or False"),
    (["--evaluate"], "need a checkpoint"),
    (["--data", "mnist"], "MNIST/raw"),
    (["--data", "imagenet32"], "preprocessing/create_imagenet_benchmark_datasets.py"),
])
def test_bad_input(tmp_path, capsys, argv, match):
    args = TINY + ["--max-iters", "1", "--save", tmp_path / "run", "--dataroot", tmp_path / "nodata"] + argv
    code, out, err = cli(args, capsys)
    assert code != 0
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_save_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(TINY + ["--save", blocker / "sub"], capsys)
    assert code == 1 and "is not writable" in err and err.count("\n") == 1
    code, _, err = cli(TINY + ["--save", blocker], capsys)
    assert code == 1 and "is a file" in err


def test_bad_checkpoint_and_conflicting_flags(tmp_path, capsys, reference_dir):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = cli(["--resume", bad, "--evaluate", "--save", tmp_path / "e"], capsys)
    assert code == 1 and str(bad) in err and err.count("\n") == 1
    code, _, err = cli(["--resume", reference_dir / "legacy" / "checkpoint.pth", "--evaluate", "--idim", "64",
                        "--save", tmp_path / "e"], capsys)
    assert code == 1 and "--idim 64 (checkpoint: 16) conflicts" in err
    # Repeating the checkpoint's own flags is fine (the paper's "same command plus --resume").
    code, _, err = cli(["--resume", reference_dir / "legacy" / "checkpoint.pth", "--sample", "4", "--idim", "16",
                        "--data", "mnist", "--imagesize", "16", "--save", tmp_path / "e"], capsys)
    assert code == 0, err


def test_script_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "RESFLOWS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train_img.py"), "--data", "digits", "--nblocks", "1-1-1",
                           "--save", str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a flag-only rule: refused when parsing
    assert proc.stderr.startswith("train_img.py: error:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()
