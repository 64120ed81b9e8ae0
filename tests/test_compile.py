"""``--compile``: compiled per-block passes give the eager results, share graphs across blocks of a shape, and
leave checkpoints interchangeable. Compiling is slow on a small CPU (inductor's C++ back end), so the models
are tiny and every test that compiles is marked slow."""
import copy
import re
import shutil

import pytest
import torch

from resflows import ResidualFlow
from resflows.config import TrainConfig
from resflows.factory import model_config_from
from resflows.layers import compiled, iResBlock

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")


def _config(**kw) -> TrainConfig:
    # 4 blocks per scale (two scales of conv blocks), 4 fully connected end blocks: four distinct block shapes
    # (the first block of the model has no leading activation).
    base = dict(data="digits", nblocks="4-4", idim=8, fc_idim=8, batchsize=4, seed=0)
    return TrainConfig(**{**base, **kw})


def _model(cfg: TrainConfig) -> ResidualFlow:
    torch.manual_seed(0)
    model = ResidualFlow(model_config_from(cfg)).train()
    with torch.no_grad():
        model.transform(torch.rand(4, *model.config.input_size))  # ActNorm initialised
    return model


def _step(model: ResidualFlow, x: torch.Tensor):
    torch.manual_seed(1)  # the same probes and roulette draws (compiled code draws nothing)
    model.zero_grad(set_to_none=True)
    z, logdet = model(x)
    # Unequal weights per sample and output: every gradient term is exercised.
    w = torch.linspace(0.5, 1.5, x.shape[0])
    (((z**2).sum(1) * w).sum() - (logdet * w.flip(0)).sum()).backward()
    return z.detach(), logdet.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.slow
def test_compiled_step_equals_eager_and_shares_graphs():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    cfg = _config()
    eager = _model(cfg)
    model = copy.deepcopy(eager)
    passes, blocks, stay_eager = compiled.enable(model)
    all_blocks = [m for m in model.modules() if isinstance(m, iResBlock)]
    assert len(blocks) == len(all_blocks) == 12 and not stay_eager
    x = torch.rand(4, *eager.config.input_size)
    before = counters["stats"]["unique_graphs"]
    ref, out = _step(eager, x), _step(model, x)
    graphs = counters["stats"]["unique_graphs"] - before
    assert _rel(out[0], ref[0]) < 1e-5 and _rel(out[1], ref[1]) < 1e-5
    assert ref[2].keys() == out[2].keys() and len(ref[2]) > 30
    for name in ref[2]:
        # A LipSwish slope's gradient is one float32 sum over whole activation maps that nearly cancels (~2e-3
        # here): the compiler's other summation order moves it by up to 3.2e-5 relative (measured). Every
        # other gradient tensor is within 1e-5 of eager's.
        tol = 1e-4 if name.endswith("beta") else 1e-5
        assert _rel(out[2][name], ref[2][name]) < tol, name
    # Blocks of one shape share a graph: at most (distinct block shapes) x (3 compiled passes).
    shapes = {tuple((type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for m in b.nnet.modules())
              for b in blocks}
    assert len(shapes) == 4
    assert 0 < graphs <= len(shapes) * 3, graphs
    assert passes.graphs == graphs and passes.seconds > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    # A second step with another number of series terms compiles nothing new.
    before = counters["stats"]["unique_graphs"]
    for seed in (2, 3, 4):
        torch.manual_seed(seed)
        model(x)[1].sum().backward()
    assert counters["stats"]["unique_graphs"] == before
    # The state_dict is untouched.
    assert list(model.state_dict()) == list(eager.state_dict())


def test_modes_that_need_double_backward_stay_eager():
    for kw, reason in ((dict(neumann_grad=False), "naive gradients"), (dict(mem_eff=False), "--mem-eff False")):
        model = ResidualFlow(model_config_from(_config(nblocks="1", fc_end=False, **kw)))
        _, blocks, eager = compiled.enable(model)
        assert not blocks and len(eager) == 1 and reason in next(iter(eager))
        assert all(b.compiled_passes is None for b in model.modules() if isinstance(b, iResBlock))

    # Blocks with passes of their own: monotone blocks and the variational dequantiser's (not compiled yet).
    model = ResidualFlow(model_config_from(_config(nblocks="1", fc_end=False, densenet=True, densenet_depth=2,
                                                   densenet_growth=8, monotone_resolvent=True, var_deq=True,
                                                   var_deq_nblocks=1, var_deq_cond_width=8, var_deq_cond_hidden=32)))
    _, blocks, eager = compiled.enable(model)
    assert not blocks and sorted(eager.values()) == [1, 1], eager
    assert any("monotone" in r for r in eager) and any("dequantiser" in r for r in eager)


def test_compile_refused_without_a_compiler(tmp_path, monkeypatch, capsys):
    import train_img

    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    argv = ["--data", "digits", "--nblocks", "1", "--idim", "4", "--fc-end", "False", "--batchsize", "4",
            "--max-iters", "1", "--nworkers", "0", "--save", str(tmp_path / "run"), "--compile", "True"]
    assert train_img.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"train_img.py: error: --compile True cannot work here: .*C\+\+ compiler", err[0]), err


@pytest.mark.slow
def test_eager_checkpoint_resumes_compiled(tmp_path, capsys):
    """An eager run resumed with --compile True continues as the eager continuation does (and the reverse)."""
    import train_img
    from resflows.checkpoint import read_checkpoint

    common = ["--data", "digits", "--nblocks", "2", "--idim", "8", "--fc-idim", "8", "--batchsize", "8",
              "--nworkers", "0", "--seed", "3", "--vis-freq", "1000", "--print-freq", "1"]
    assert train_img.main(common + ["--max-iters", "2", "--save", str(tmp_path / "a")]) == 0
    src = tmp_path / "a" / "models" / "most_recent.pth"
    for name, flags in (("eager", []), ("compiled", ["--compile", "True"])):
        shutil.copytree(tmp_path / "a", tmp_path / name)
        assert train_img.main(["--resume", str(tmp_path / name / "models" / "most_recent.pth"), "--max-iters", "4"] + flags) == 0
    capsys.readouterr()
    eager = read_checkpoint(str(tmp_path / "eager" / "models" / "most_recent.pth"))
    comp = read_checkpoint(str(tmp_path / "compiled" / "models" / "most_recent.pth"))
    assert comp["config"]["compile"] is True and eager["config"]["compile"] is False and comp["step"] == 4
    assert list(comp["model"]) == list(eager["model"]) == list(read_checkpoint(str(src))["model"])
    worse = {}
    for k, v in eager["model"].items():
        if v.is_floating_point():
            # The last step's estimator moments are means of small log-dets (~3e-4 a block): 3e-5 relative apart
            # (measured) from float32 summation order alone; every weight and buffer else is within 1e-5.
            tol = 1e-4 if k.endswith(("last_firmom", "last_secmom")) else 1e-5
            if _rel(comp["model"][k].double(), v.double()) >= tol:
                worse[k] = _rel(comp["model"][k].double(), v.double())
    assert not worse, worse
    log = (tmp_path / "compiled" / "logs").read_text()
    assert re.search(r"compiled \d+ graphs in [\d.]+ s", log), log[-2000:]
    # And back: the compiled run's checkpoint resumes eager.
    assert train_img.main(["--resume", str(tmp_path / "compiled" / "models" / "most_recent.pth"), "--max-iters", "5",
                           "--compile", "False"]) == 0
