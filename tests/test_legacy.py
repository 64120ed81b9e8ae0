"""The paper's own checkpoint (tests/reference/legacy, written by its train_img.py) through our reader."""
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from resflows import CheckpointError, bits_per_dim, exact_logdet, load_model, read_checkpoint
from resflows.legacy import load_paper_checkpoint, read_paper_pickle


@pytest.fixture(scope="module")
def legacy(request):
    from tests.conftest import REFERENCE

    return REFERENCE / "legacy" / "checkpoint.pth", torch.load(REFERENCE / "legacy" / "expected.pt", weights_only=True)


def test_z_matches_the_paper(legacy):
    path, exp = legacy
    model = load_model(str(path))
    with torch.no_grad():
        z = model.transform(exp["x"])
    assert (z - exp["z"]).abs().max() < 1e-5


def test_inverse_recovers_x(legacy):
    path, exp = legacy
    model = load_model(str(path))
    assert (model.inverse(exp["z"]) - exp["x"]).abs().max() < 1e-4


def test_ema_weights_with_converged_power_iterations(legacy):
    path, exp = legacy
    model = load_model(str(path), ema=True)
    with torch.no_grad():
        z = model.transform(exp["x"])
    assert (z.double() - exp["z_ema"]).abs().max() < 1e-4


def test_exact_logdet_and_bits_per_dim(legacy):
    path, exp = legacy
    model = load_model(str(path)).double()
    z, logdet = exact_logdet(model, exp["x"].double())
    assert torch.allclose(logdet, exp["logdet_exact"], rtol=1e-6, atol=0)
    bpd = bits_per_dim(z, logdet, (1, 16, 16), nvals=256)
    assert torch.allclose(bpd, exp["bpd_exact"], rtol=0, atol=1e-6)


def test_stochastic_logdet_estimate_is_unbiased(legacy):
    path, exp = legacy
    model = load_model(str(path))
    x = exp["x"].repeat(16, 1, 1, 1)  # 16 independent probes per image per forward
    torch.manual_seed(0)
    means = []
    with torch.no_grad():
        for _ in range(30):
            _, ld = model(x)
            means.append(ld.view(16, 8).mean(0).double())
    m = torch.stack(means)
    mean, se = m.mean(0), m.std(0) / math.sqrt(m.shape[0])
    assert torch.all((mean - exp["logdet_exact"]).abs() < 3 * se), (mean - exp["logdet_exact"], se)


def test_read_checkpoint_maps_the_paper_flags(legacy):
    path, _ = legacy
    ckpt = read_checkpoint(str(path))
    assert ckpt["format"] == "paper"
    assert ckpt["config"]["data"] == "mnist" and ckpt["config"]["imagesize"] == 16
    assert ckpt["model_config"]["nblocks"] == [1, 1, 1] and ckpt["model_config"]["fc_idim"] == 32
    assert ckpt["best_test_bpd"] == pytest.approx(6.1703, abs=1e-4)


# -- the guarded unpickler ------------------------------------------------------------------------------
class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("legacy_format", [False, True])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, legacy_format):
    marker = tmp_path / "pwned"
    for payload in (_Evil(f"touch {marker}"), _WritesFile(str(marker))):
        path = tmp_path / "evil.pth"
        torch.save({"state_dict": {}, "args": payload}, path, _use_new_zipfile_serialization=not legacy_format)
        with pytest.raises(CheckpointError, match="not a Residual Flows checkpoint|refusing"):
            read_checkpoint(str(path))
        with pytest.raises(CheckpointError):
            load_model(str(path))
        assert not marker.exists()


def test_old_lib_module_names_become_stand_ins(tmp_path):
    """Released 2019 checkpoints name lib.* classes; they must load without importing anything."""
    mod = types.ModuleType("lib.utils")
    sys.modules["lib"] = types.ModuleType("lib")
    sys.modules["lib.utils"] = mod

    class ExponentialMovingAverage:
        pass

    ExponentialMovingAverage.__module__ = "lib.utils"
    ExponentialMovingAverage.__qualname__ = "ExponentialMovingAverage"
    mod.ExponentialMovingAverage = ExponentialMovingAverage
    ema = ExponentialMovingAverage()
    ema.shadow_params = {"w": torch.ones(2)}
    ema.decay = 0.999
    path = tmp_path / "old.pth"
    try:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "args": {"data": "mnist"}, "ema": ema}, path)
    finally:
        del sys.modules["lib.utils"], sys.modules["lib"]
    out = load_paper_checkpoint(str(path))
    assert torch.equal(out["ema"]["w"], torch.ones(2))
    assert "lib" not in sys.modules


def test_legacy_container_format_is_read(tmp_path):
    path = tmp_path / "legacy.pth"
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    torch.save({"a": t, "b": t[1:], "c": torch.tensor(7, dtype=torch.int64)}, path, _use_new_zipfile_serialization=False)
    out = read_paper_pickle(str(path))
    assert torch.equal(out["a"], t) and torch.equal(out["b"], t[1:]) and int(out["c"]) == 7


def test_truncated_paper_checkpoint(tmp_path, legacy):
    path, _ = legacy
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[:20000])
    with pytest.raises(CheckpointError, match=str(cut)):
        read_checkpoint(str(cut))


def test_names_in_the_file_do_not_trigger_imports(tmp_path):
    """``torch._dynamo`` named by a pickle is refused without importing it (torch imports lazily)."""
    import zipfile

    path = tmp_path / "lazy.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02ctorch\n_dynamo\nq\x00.")
    code = (f"import sys, torch; from resflows.legacy import read_paper_pickle, NotACheckpointError\n"
            f"try:\n    read_paper_pickle({str(path)!r})\nexcept NotACheckpointError:\n    pass\n"
            f"print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
