"""--var-deq end to end: the Monotone Flows code's state_dict layout and parameter count, flags, training with the
variational bound (with the paper's and the i-DenseNet blocks), exact resume with the EMA covering q(u|x),
--evaluate with the single-sample and importance-weighted bounds, sampling, and that code's lib.* checkpoints."""
import json
import math

import pytest
import torch

from resflows import load_model, read_checkpoint
from resflows.config import ModelConfig
from resflows.model import ResidualFlow
from tests.helpers import assert_same_training_state, cli, run_ok
from tests.test_idensenet import _fork_checkpoint

TINY = ["--data", "digits", "--nblocks", "1", "--idim", "16", "--fc-end", "False", "--var-deq", "True",
        "--densenet_depth", "2", "--densenet_growth", "8", "--var-deq-cond-width", "8", "--var-deq-cond-hidden", "32",
        "--batchsize", "32", "--val-batchsize", "200", "--nworkers", "0", "--seed", "0", "--print-freq", "1",
        "--vis-freq", "1000"]


def test_state_dict_layout_and_size_are_the_reference_codes():
    """CIFAR-10 size, 3 blocks: the keys and shapes of the Monotone Flows code's dequantiser (state_dict root
    ``dequantizer.nnet.{b}``) and its parameter count per block (7,332,406 with CPila; CLipSwish adds one
    slope per dense layer)."""
    with torch.device("meta"):
        model = ResidualFlow(ModelConfig(input_size=(3, 32, 32), nblocks=(1,), densenet=True, act="clipswish",
                                         var_deq=True, var_deq_nblocks=3))
        plain = ResidualFlow(ModelConfig(input_size=(3, 32, 32), nblocks=(1,), densenet=True, act="clipswish"))
    sd = model.state_dict()
    assert plain.dequantizer is None and not any(k.startswith("dequantizer") for k in plain.state_dict())
    assert set(plain.state_dict()) == {k for k in sd if not k.startswith("dequantizer.")}
    pre = "dequantizer.nnet.2."
    expected = {
        "geom_p": (), "lamb": (), "last_n_samples": (1,), "last_firmom": (1,), "last_secmom": (1,),
        "nnet.0.nnet.0.weight": (64, 3, 3, 3),
        "nnet.0.nnet.3.nnet.0.weight": (64,),  # GroupNorm
        "nnet.0.nnet.3.nnet.2.weight": (512, 64, 3, 3), "nnet.0.nnet.3.nnet.5.weight": (512, 512, 1, 1),
        "nnet.0.nnet.3.nnet.8.weight": (64, 512, 3, 3),
        "nnet.1.lipschitz_dense_layer.K1_unnormalized": (1,),
        "nnet.1.lipschitz_dense_layer.network.0.weight": (86, 3, 3, 3),
        "nnet.2.lipschitz_dense_layer.network.0.weight": (86, 175, 3, 3),
        "nnet.3.lipschitz_dense_layer.network.0.weight": (86, 347, 3, 3),
        "nnet.3.lipschitz_dense_layer.network.0.u": (86 * 32 * 32,),
        "nnet.3.inject_layer.nnet.8.weight": (172, 512, 3, 3),
        "nnet.3.inject_layer.nnet.6.weight": (512,),
        "nnet.1.inject_layer.match_channel.weight": (172, 64, 3, 3),
        "nnet.4.nnet.weight": (3, 519, 1, 1), "nnet.4.nnet.u": (3,), "nnet.4.nnet.v": (519,),
    }
    for k, shape in expected.items():
        assert tuple(sd[pre + k].shape) == shape, k
    assert not any(k.startswith("dequantizer.nnet.0.nnet.0.nnet.1.match_channel") for k in sd)  # identity skips there
    assert not any(k.startswith("dequantizer.nnet.3.") for k in sd)
    for block in model.dequantizer.nnet:
        assert sum(p.numel() for p in block.parameters() if p.requires_grad) == 7_332_406 + 3


def test_flags(tmp_path, capsys):
    """Refused when parsing (exit 2, one line), before anything is written."""
    code, _, err = cli(TINY + ["--var-deq-act", "CLipSwish", "--densenet_growth", "7", "--max-iters", "1", "--save",
                               tmp_path / "x"], capsys)
    assert code == 2 and "--densenet_growth" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(TINY + ["--padding", "1"], capsys)
    assert code == 2 and "--padding" in err
    code, _, err = cli(TINY + ["--var-deq-cond-width", "6"], capsys)
    assert code == 2 and "--var-deq-cond-width" in err
    code, _, err = cli(["--data", "digits", "--nblocks", "2-2", "--add-noise", "False", "--eval-dequant-samples", "4"], capsys)
    assert code == 2 and "--eval-dequant-samples" in err
    assert not (tmp_path / "x").exists()


# The paper's blocks in the slow suite: the same path, with the i-DenseNet main flow in the default one.
@pytest.mark.parametrize("dense", [pytest.param(False, marks=pytest.mark.slow), True], ids=["paper_blocks", "dense_blocks"])
def test_training_resume_evaluate_and_sample(tmp_path, capsys, dense):
    flags = TINY + (["--densenet", "True", "--act", "CLipSwish"] if dense else [])
    out = run_ok(flags + ["--max-iters", "4", "--save", tmp_path / "full"], capsys)
    assert "flow bits/dim" in out and "log q bits/dim" in out
    run_ok(flags + ["--max-iters", "2", "--save", tmp_path / "split"], capsys)
    run_ok(["--resume", tmp_path / "split" / "models" / "most_recent.pth", "--max-iters", "4", "--nworkers", "0"], capsys)
    full, _ = assert_same_training_state(tmp_path / "full" / "models" / "most_recent.pth",
                                         tmp_path / "split" / "models" / "most_recent.pth")
    deq = [k for k in full["model"] if k.startswith("dequantizer.") and k.endswith("weight")]
    assert deq and all(k in full["ema"] for k in deq)
    # The EMA follows the dequantiser's weights (it moved away from the initial copy, towards the model).
    assert any(not torch.equal(full["ema"][k], full["model"][k]) for k in deq)

    ckpt = tmp_path / "full" / "models" / "most_recent.pth"
    results = {}
    for k in (1, 4):
        out = run_ok(["--resume", ckpt, "--evaluate", "--eval-dequant-samples", str(k), "--seed", "1", "--nworkers", "0",
                      "--save", tmp_path / f"eval{k}"], capsys)
        results[k] = json.loads((tmp_path / f"eval{k}" / "eval.json").read_text())
        assert results[k]["dequant_samples"] == k and results[k]["n_images"] == 297
    assert results[1]["bound"] == "single-sample" and results[4]["bound"] == "importance-weighted"
    assert math.isclose(results[1]["test_flow_bpd"] + results[1]["test_logq_bpd"], results[1]["test_bpd"], rel_tol=1e-9)
    assert results[4]["test_bpd"] < results[1]["test_bpd"]  # the tighter bound
    out = run_ok(["--resume", ckpt, "--sample", "4", "--save", tmp_path / "s", "--nworkers", "0"], capsys)
    assert "wrote 4 samples" in out


def test_uniform_importance_weighted_bound(tmp_path, capsys):
    """Uniform dequantisation, K = 4: noise drawn in the evaluation (q = 1)."""
    flags = TINY[:TINY.index("--var-deq")] + TINY[TINY.index("--var-deq") + 2:]
    run_ok(flags + ["--max-iters", "2", "--save", tmp_path / "u"], capsys)
    ckpt = tmp_path / "u" / "models" / "most_recent.pth"
    res = {}
    for k in (1, 4):
        run_ok(["--resume", ckpt, "--evaluate", "--eval-dequant-samples", str(k), "--seed", "1", "--nworkers", "0",
                "--save", tmp_path / f"e{k}"], capsys)
        res[k] = json.loads((tmp_path / f"e{k}" / "eval.json").read_text())
    # Nearly uniform densities inside the bins after 2 steps: the gap is small, so only consistency is asserted here
    # (that the bound tightens with K is tested exactly in tests/layers/test_vardeq.py).
    assert res[4]["bound"] == "importance-weighted" and res[4]["dequant_samples"] == 4
    assert res[4]["test_bpd"] < res[1]["test_bpd"] + 3 * res[1]["test_bpd_stderr"]


def test_the_forks_var_deq_command_scaled_down(tmp_path, capsys):
    """The Monotone Flows README's var-deq CIFAR-10 command at digits size (CLipSwish for CPila, residual main blocks
    in place of --monotone_resolvent True: neither is in this version)."""
    flags = ["--data", "digits", "--nblocks", "1-1", "--densenet", "True", "--learnable_concat", "True", "--act", "CLipSwish",
             "--densenet_depth", "2", "--densenet_growth", "16", "--n-exact-terms", "10", "--lr", "0.001",
             "--val-batchsize", "64", "--var-deq", "True", "--var-deq-nblocks", "3", "--var-deq-act", "CLipSwish",
             "--var-deq-mf", "False", "--batchsize", "16", "--var-deq-cond-width", "8", "--var-deq-cond-hidden", "32",
             "--max-iters", "1", "--nworkers", "0", "--save", tmp_path / "r"]
    out = run_ok(flags, capsys)
    assert "step 1" in out


def test_reference_checkpoints_load(tmp_path):
    """A checkpoint in that code's format (lib.* pickle, args namespace, EMA object) with a dequantiser."""
    path = tmp_path / "mf.pth"
    flags = ("--data digits --nblocks 1 --densenet True --densenet_depth 2 --densenet_growth 8 --act CLipSwish --fc-end False "
             "--var-deq True --var-deq-cond-width 8 --var-deq-cond-hidden 32")
    model, shadow = _fork_checkpoint(path, flags)
    ckpt = read_checkpoint(str(path))
    assert ckpt["config"]["var_deq"] and ckpt["model_config"]["var_deq_act"] == "clipswish"
    loaded = load_model(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert any(k.startswith("dequantizer.") for k in shadow)
    ema = load_model(str(path), ema=True)
    for k, v in shadow.items():
        assert torch.equal(ema.state_dict()[k], v), k


def test_monotone_dequantizer_trains_and_resumes(tmp_path, capsys):
    """--var-deq-mf True: the dequantiser's blocks are monotone blocks (same keys); two steps train, the checkpoint
    holds them and evaluates."""
    run = tmp_path / "mf"
    code, out, err = cli(TINY + ["--var-deq-mf", "True", "--max-iters", "2", "--save", run], capsys)
    assert code == 0, err
    from resflows.layers.monotone import MonotoneBlock
    from resflows.loading import load_model

    model = load_model(str(run / "models" / "most_recent.pth"))
    assert model.dequantizer is not None and all(isinstance(b, MonotoneBlock) for b in model.dequantizer.nnet)
    code, out, err = cli(["--resume", run / "models" / "most_recent.pth", "--evaluate", "--nworkers", "0",
                          "--val-batchsize", "200"], capsys)
    assert code == 0, err
