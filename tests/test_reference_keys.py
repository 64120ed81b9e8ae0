"""Every paper reference key list is matched by the model that ``train_img.py``'s own flag parsing builds.

The argv column is what a researcher types (the flags in tests/reference/README.md); the model goes
through ``resflows.cli.parse_args`` and ``resflows.factory.model_config_from``, exactly as in the script,
so a wrong default or a wrong flag-to-model mapping fails here, not only a wrong layer.
"""
import pytest
import torch

from resflows.cli import parse_args
from resflows.factory import model_config_from
from resflows.model import ResidualFlow

# file -> the train_img.py command line that the paper's code ran to produce it.
PAPER_FILES = {
    "mnist28_2-2-2_idim64.txt": "--data mnist --imagesize 28 --nblocks 2-2-2 --idim 64",
    "cifar32_2-2-2_idim64_factorout_hybrid.txt":
        "--data cifar10 --nblocks 2-2-2 --idim 64 --factor-out True --fc-end False --task hybrid",
    "cifar32_2-2_idim32_coupling.txt": "--data cifar10 --block coupling --nblocks 2-2 --idim 32",
    "cifar32_1-1_idim32_quadratic_fcactnorm_batchnorm.txt":
        "--data cifar10 --nblocks 1-1 --idim 32 --quadratic True --fc-actnorm True --batchnorm True --fc-end False",
    "cifar32_1-1_idim16_learnp_vnorms2222_squeezefirst-input12x16x16.txt":
        "--data cifar10 --squeeze-first True --nblocks 1-1 --idim 16 --learn-p True --fc-end False",
    "mnist28_1-1-1_idim32_kernels3-3_vnorms333_factorout.txt":
        "--data mnist --imagesize 28 --nblocks 1-1-1 --idim 32 --kernels 3-3 --vnorms 333 --factor-out True",
}


def read_reference(path):
    out = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        out.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return out


@pytest.fixture(autouse=True)
def _no_power_iterations(monkeypatch):
    # Keys, shapes and dtypes do not depend on the power-iteration vectors' values; skipping their
    # convergence at construction keeps these full-size models fast to build.
    from resflows.layers.lipschitz import InducedNorm

    monkeypatch.setattr(InducedNorm, "_converge_from_restarts", lambda self, restarts=10: None)


def model_from_argv(argv: str) -> ResidualFlow:
    cfg, _ = parse_args(argv.split())
    return ResidualFlow(model_config_from(cfg))


@pytest.mark.parametrize("name", sorted(PAPER_FILES))
def test_flags_build_the_papers_state_dict(reference_dir, name):
    model = model_from_argv(PAPER_FILES[name])
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert ours == read_reference(reference_dir / "state_dict" / name)


@pytest.mark.parametrize("name", sorted(PAPER_FILES))
def test_a_paper_state_dict_loads_strictly(reference_dir, name):
    # A state_dict with exactly the reference keys, shapes and dtypes (values from a second model) loads.
    model = model_from_argv(PAPER_FILES[name])
    ref = read_reference(reference_dir / "state_dict" / name)
    donor = model_from_argv(PAPER_FILES[name]).state_dict()
    sd = {k: donor[k].clone() for k, _, _ in ref}
    model.load_state_dict(sd, strict=True)
    for k, shape, dtype in ref:
        assert tuple(sd[k].shape) == shape and str(sd[k].dtype) == f"torch.{dtype}"


def test_every_paper_reference_file_is_in_the_table(reference_dir):
    # The i-DenseNets files (idensenet_*) are matched in their own test file.
    files = {p.name for p in (reference_dir / "state_dict").glob("*.txt") if not p.name.startswith("idensenet_")}
    assert files == set(PAPER_FILES)


def test_normalize_statistics_are_state_and_shared_with_init_layer():
    model = model_from_argv(PAPER_FILES["cifar32_2-2-2_idim64_factorout_hybrid.txt"])
    assert model.init_layer is model.transforms[0].chain[0]
    sd = model.state_dict()
    assert torch.equal(sd["init_layer.mean"], torch.tensor([0.4914, 0.4822, 0.4465]))
    assert torch.equal(sd["transforms.0.chain.0.std"], torch.tensor([0.2023, 0.1994, 0.2010]))
    # Values come from the checkpoint: a changed mean changes the output.
    x = torch.rand(2, 3, 32, 32)
    y0 = model.init_layer(x)[0]
    model.load_state_dict({**sd, "init_layer.mean": torch.zeros(3), "transforms.0.chain.0.mean": torch.zeros(3)})
    assert not torch.allclose(model.init_layer(x)[0], y0)
