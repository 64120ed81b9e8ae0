"""Our checkpoint format: safe to load, atomic to write, clear errors for bad files."""
import json
import os

import pytest
import torch

from resflows import CheckpointError, ModelConfig, ResidualFlow, TrainConfig, load_model, read_checkpoint
from resflows.checkpoint import atomic_save, rng_state, save_checkpoint, set_rng_state, write_json


def _model():
    torch.manual_seed(0)
    model = ResidualFlow(ModelConfig(input_size=(1, 8, 8), nblocks=(1, 1), idim=8, fc_idim=8, fc_nblocks=1))
    model(torch.rand(4, 1, 8, 8))
    return model


def _state(model, ema=None):
    return {
        "config": TrainConfig(data="digits", nblocks="1-1", idim=8, fc_idim=8).to_dict(),
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "ema": (ema or model).state_dict(),
        "optimizer": torch.optim.Adam(model.parameters()).state_dict(),
        "scheduler": None,
        "epoch": 3,
        "itr": 120,
        "best_test_bpd": 2.5,
        "last_test_bpd": 2.6,
        "rng": rng_state(),
    }


def test_round_trip_loads_with_weights_only(tmp_path):
    model = _model()
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), _state(model))
    raw = torch.load(path, weights_only=True)  # no pickled objects inside
    assert raw["format"] == "resflows" and raw["format_version"] == 1 and raw["itr"] == 120
    loaded = load_model(str(path))
    assert not loaded.training
    x = torch.rand(3, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.transform(x), model.transform(x))
    assert read_checkpoint(str(path))["format"] == "resflows"


def test_ema_weights_are_loaded(tmp_path):
    model = _model()
    ema = _model()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    path = tmp_path / "ckpt.pth"
    save_checkpoint(str(path), _state(model, ema))
    loaded = load_model(str(path), ema=True)
    assert torch.allclose(loaded.transforms[0].chain[1].weight, ema.transforms[0].chain[1].weight)


def test_rng_state_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_atomic_write_leaves_the_old_file_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "most_recent.pth"
    atomic_save({"v": 1}, str(path))

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert os.listdir(tmp_path) == ["most_recent.pth"]  # no temporary file left behind


def test_json_files_are_written_the_same_atomic_way(tmp_path):
    path = tmp_path / "eval.json"
    write_json(str(path), {"test_bpd": 3.25})
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        write_json(str(path), {"test_bpd": float("nan")})
    assert json.loads(path.read_text()) == {"test_bpd": 3.25}
    assert os.listdir(tmp_path) == ["eval.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # the permissions a plain open() gives


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("kind", ["missing", "empty", "folder", "garbage", "truncated", "plain_tensor"])
def test_bad_files_give_one_clear_line(tmp_path, kind):
    path = tmp_path / "bad.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(os.urandom(1000))
    elif kind == "truncated":
        good = tmp_path / "good.pth"
        save_checkpoint(str(good), _state(_model()))
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "plain_tensor":
        torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError) as info:
        load_model(str(path))
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


def test_weights_of_another_architecture(tmp_path):
    model = _model()
    state = _state(model)
    state["model_config"] = ModelConfig(input_size=(1, 8, 8), nblocks=(1, 1), idim=16, fc_idim=8, fc_nblocks=1).to_dict()
    path = tmp_path / "mismatch.pth"
    save_checkpoint(str(path), state)
    with pytest.raises(CheckpointError, match="do not fit this architecture"):
        load_model(str(path))
