"""Bad inputs to the Python API (README "Python API"): each call raises ValueError naming the expected shape,
dtype or range, instead of a raw torch error from inside a layer or a silently wrong number (NaN log-dets,
bits/dim for the wrong image size)."""
from __future__ import annotations

import copy
import re
from typing import Callable, Dict, NamedTuple

import pytest
import torch

import resflows
from resflows import ModelConfig, ResidualFlow


def _model(**kw) -> ResidualFlow:
    torch.manual_seed(0)
    # Small enough to build in a second: one scale, no fully connected blocks at the end.
    cfg = dict(input_size=(1, 4, 4), nblocks=(1,), idim=4, actnorm=False, fc=False, fc_end=False)
    cfg.update(kw)
    return ResidualFlow(ModelConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def models() -> Dict[str, ResidualFlow]:
    return {
        "density": _model(),  # logit input layer: x must be in [0, 1]
        "no_logit": _model(init_layer=None),
        "hybrid": _model(classification=True, n_classes=3, cdim=4),
    }


def _x(n: int = 2, c: int = 1, size: int = 4, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.9 + 0.05


def _z(m: ResidualFlow, n: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, m.latent_dim, generator=torch.Generator().manual_seed(2), dtype=dtype)


class Case(NamedTuple):
    call: Callable[[Dict[str, ResidualFlow]], object]
    message: str  # regex searched in the ValueError's message


_LD = torch.zeros(2)
CASES = {
    # model.inverse
    "inverse: float64 z into a float32 model": Case(
        lambda m: m["density"].inverse(_z(m["density"], dtype=torch.float64)),
        r"z has dtype torch\.float64, but the model's parameters are torch\.float32"),
    "inverse: empty batch": Case(lambda m: m["density"].inverse(_z(m["density"])[:0]), r"z is an empty batch"),
    "inverse: no batch dimension": Case(lambda m: m["density"].inverse(_z(m["density"])[0]),
                                        r"z has shape \[16\]; this model expects \[B, 16\]"),
    "inverse: NaN z": Case(lambda m: m["density"].inverse(_z(m["density"]) * float("nan")),
                           r"z has non-finite values"),
    # forward and the other entry points
    "forward: wrong channel count": Case(lambda m: m["density"](_x(c=3)),
                                         r"x has shape \[2, 3, 4, 4\]; this model expects images \[B, 1, 4, 4\]"),
    "forward: wrong image size": Case(lambda m: m["density"](_x(size=8)),
                                      r"x has shape \[2, 1, 8, 8\]; this model expects images \[B, 1, 4, 4\]"),
    "forward: one image without a batch dimension": Case(lambda m: m["density"](_x()[0]),
                                                         r"x has shape \[1, 4, 4\]; this model expects images"),
    "forward: float64 x into a float32 model": Case(lambda m: m["density"](_x(dtype=torch.float64)),
                                                    r"x has dtype torch\.float64, but the model's parameters are"),
    "forward: empty batch": Case(lambda m: m["density"](_x()[:0]), r"x is an empty batch"),
    "forward: x outside [0, 1] (NaN log-det before)": Case(
        lambda m: m["density"](_x() * 2 - 0.5), r"x has values in \[-?[\d.]+, [\d.]+\]; .* expects dequantised "
                                                r"images in \[0, 1\]"),
    "forward: pixel levels 0..255 instead of [0, 1]": Case(lambda m: m["density"](_x() * 255),
                                                           r"expects dequantised images in \[0, 1\]"),
    "forward: NaN x": Case(lambda m: m["density"](_x() * float("nan")), r"expects dequantised images in \[0, 1\]"),
    "forward: NaN x without the logit layer": Case(lambda m: m["no_logit"](_x() * float("nan")),
                                                   r"x has non-finite values"),
    "forward_with_logits: wrong channel count": Case(lambda m: m["hybrid"].forward_with_logits(_x(c=3)),
                                                     r"expects images \[B, 1, 4, 4\]"),
    "classify: float64 x": Case(lambda m: m["hybrid"].classify(_x(dtype=torch.float64)),
                                r"x has dtype torch\.float64"),
    # bits_per_dim
    "bits_per_dim: image shape of other images": Case(
        lambda m: resflows.bits_per_dim(torch.zeros(2, 64), _LD, (3, 32, 32), 256),
        r"z has 64 values an example, but image_shape \(3, 32, 32\) means 3072"),
    "bits_per_dim: image shape (H, W) only": Case(
        lambda m: resflows.bits_per_dim(torch.zeros(2, 64), _LD, (8, 8), 256),
        r"image_shape must be \(C, H, W\) of positive ints, got \(8, 8\)"),
    "bits_per_dim: logdet [B, 1] (broadcast to [B, B] before)": Case(
        lambda m: resflows.bits_per_dim(torch.zeros(2, 64), torch.zeros(2, 1), (1, 8, 8), 256),
        r"logdet has shape \[2, 1\]; expected \[2\]"),
    "bits_per_dim: nvals 1": Case(lambda m: resflows.bits_per_dim(torch.zeros(2, 64), _LD, (1, 8, 8), 1),
                                  r"nvals .* must be >= 2, got 1"),
    "bits_per_dim: padding channels not counted": Case(
        lambda m: resflows.bits_per_dim(torch.zeros(2, 128), _LD, (1, 8, 8), 256),
        r"z has 128 values an example, but image_shape \(1, 8, 8\) means 64"),
    # exact_logdet
    "exact_logdet: float32 x into a float64 model": Case(
        lambda m: resflows.exact_logdet(copy.deepcopy(m["density"]).double(), _x(1)), r"x is torch\.float32 .* parameters are "
                                                                   r"torch\.float64"),
    "exact_logdet: empty batch": Case(lambda m: resflows.exact_logdet(m["density"], _x()[:0]),
                                      r"x must be a non-empty batch"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_value_error_naming_what_is_expected(name, models):
    case = CASES[name]
    with pytest.raises(ValueError) as info:
        case.call(models)
    message = str(info.value)
    assert re.search(case.message, message), message
    assert "\n" not in message


def test_good_inputs_still_work(models):
    m = models["density"]
    x = _x()
    z, logdet = m(x)
    bpd = resflows.bits_per_dim(z, logdet, (1, 4, 4), nvals=256)
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()
    assert torch.allclose(m.inverse(z), x, atol=1e-4)
    z2 = torch.zeros(2, 1, 4, 4)  # z may come shaped like the image, as long as its size is the latent's
    assert m.inverse(z2).shape == (2, 1, 4, 4)
    assert resflows.bits_per_dim(torch.zeros(2, 2, 4, 4), logdet, (1, 4, 4), 256, padding=1).shape == (2,)
    _, logits = models["hybrid"].classify(x), models["hybrid"].forward_with_logits(x)[2]
    assert logits.shape == (2, 3)


def test_value_checks_stay_out_of_the_training_step(monkeypatch, tmp_path):
    """The min/max behind the range check is a device synchronisation on GPUs: the trainer turns it off for
    its model (and the EMA copy), so a training step runs no such reduction."""
    from resflows.config import TrainConfig
    from resflows.distributed import DistInfo
    from resflows.factory import model_config_from
    from resflows.loaders import tensor_data
    from resflows.trainer import Trainer

    cfg = TrainConfig(data="digits", nblocks="1", idim=4, fc_end=False, batchsize=4, seed=0)
    model = ResidualFlow(model_config_from(cfg))
    x = torch.rand(4, *model.config.input_size)
    trainer = Trainer(cfg, DistInfo(device=torch.device("cpu")), model, str(tmp_path),
                      data=tensor_data(x, torch.zeros(4, dtype=torch.long), 4))  # ActNorm initialised on x
    assert trainer.model.check_values is False
    assert trainer.ema.model.check_values is False
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer.forward_backward(x, torch.zeros(4, dtype=torch.long), sync=True, n_accum=1)
    assert calls == []
    # The public API itself does check (and still fails on a NaN image with the check on).
    trainer.model.check_values = True
    trainer.model.transform(x)
    assert calls == [1]


# -- load_model and load_toy_model: bad arguments and bad files --------------------------------------------------
# Bad arguments raise ValueError naming the argument; a bad file raises resflows.CheckpointError with one line
# naming the file, never a raw torch error or a model with non-finite weights.
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, str]:
    """An image checkpoint (ours) and a train_toy.py checkpoint, both tiny, written once."""
    from resflows.checkpoint import rng_state, save_checkpoint
    from resflows.toy import ToyConfig, ToyTrainer, build_toy_model

    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = ResidualFlow(ModelConfig(input_size=(1, 8, 8), nblocks=(1,), idim=4, fc_end=False, actnorm=False))
    image = str(folder / "image.pth")
    save_checkpoint(image, {
        "config": resflows.TrainConfig(data="digits", nblocks="1", idim=4, fc_end=False, actnorm=False).to_dict(),
        "model_config": model.config.to_dict(), "model": model.state_dict(), "ema": model.state_dict(),
        "optimizer": torch.optim.Adam(model.parameters()).state_dict(), "scheduler": None, "epoch": 0, "itr": 0,
        "best_test_bpd": None, "last_test_bpd": None, "rng": rng_state()})
    cfg = ToyConfig(nblocks=1, dims=(4,), batch_size=4, test_batch_size=4, save=str(folder))
    trainer = ToyTrainer(cfg, build_toy_model(cfg), torch.device("cpu"), str(folder))
    toy = trainer.save("toy.pth")
    from tests.conftest import REFERENCE

    return {"image": image, "toy": toy, "folder": str(folder), "paper": str(REFERENCE / "legacy" / "checkpoint.pth")}


def _variant(files, which: str, edit: Callable[[dict], None], name: str) -> str:
    ckpt = torch.load(files[which], weights_only=True)
    edit(ckpt)
    path = f"{files['folder']}/{name}"
    torch.save(ckpt, path)
    return path


def _flipped(files, which: str) -> str:
    import zipfile

    data = bytearray(open(files[which], "rb").read())
    with zipfile.ZipFile(files[which]) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    head = info.header_offset
    start = head + 30 + int.from_bytes(data[head + 26:head + 28], "little") + int.from_bytes(data[head + 28:head + 30], "little")
    data[start + info.file_size // 2] ^= 0x10
    path = f"{files['folder']}/flipped-{which}.pth"
    open(path, "wb").write(bytes(data))
    return path


def _bomb(files) -> str:
    import zipfile

    path = f"{files['folder']}/bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/data/0", bytes(64 << 20))
    return path


def _toy_nan(c):
    next(iter(c["model"].values())).view(-1)[0] = float("nan")


def _toy_set(**values):
    return lambda c: c["config"].update(values)


class FileCase(NamedTuple):
    call: Callable[[Dict[str, str]], object]
    error: type
    message: str  # regex searched in the message


def _load(path, **kw):
    return resflows.load_model(path, **kw)


def _toy(path):
    from resflows.toy import load_toy_model

    return load_toy_model(path)


def _paper(path):
    from resflows.legacy import load_paper_checkpoint  # NotACheckpointError is a ValueError

    return load_paper_checkpoint(path)


FILE_CASES = {
    # load_model's arguments
    "load_model: path None": FileCase(lambda f: _load(None), ValueError, r"path must be a checkpoint file name .* got NoneType"),
    "load_model: path an int": FileCase(lambda f: _load(3), ValueError, r"path must be a checkpoint file name"),
    "load_model: path empty": FileCase(lambda f: _load(""), ValueError, r"path must be a non-empty checkpoint file name"),
    "load_model: ema 'yes'": FileCase(lambda f: _load(f["image"], ema="yes"), ValueError, r"ema must be True or False, got 'yes'"),
    "load_model: map_location 'banana'": FileCase(lambda f: _load(f["image"], map_location="banana"), ValueError,
                                                  r"map_location must be a device such as 'cpu' or 'cuda:0', got 'banana'"),
    "load_model: map_location 3.5": FileCase(lambda f: _load(f["image"], map_location=3.5), ValueError,
                                             r"map_location must be a device .* got float"),
    "load_model: map_location cuda:99": FileCase(lambda f: _load(f["image"], map_location="cuda:99"), ValueError,
                                                 r"map_location 'cuda:99': (no CUDA GPU|only \d+ CUDA device)"),
    # load_model's files
    "load_model: a folder": FileCase(lambda f: _load(f["folder"]), resflows.CheckpointError, r"is a folder, not a checkpoint file"),
    "load_model: a toy checkpoint": FileCase(lambda f: _load(f["toy"]), resflows.CheckpointError,
                                             r"a train_toy.py checkpoint; load it with resflows.toy.load_toy_model"),
    "load_model: ema=True without EMA": FileCase(
        lambda f: _load(_variant(f, "image", lambda c: c.update(ema=None), "no-ema.pth"), ema=True),
        resflows.CheckpointError, r"no-ema.pth: has no EMA weights; load it with ema=False"),
    "load_model: a flipped byte": FileCase(lambda f: _load(_flipped(f, "image")), resflows.CheckpointError,
                                           r"flipped-image.pth: the file is damaged: Bad CRC-32"),
    "load_model: a zip bomb": FileCase(lambda f: _load(_bomb(f)), resflows.CheckpointError, r"bomb.pth: .*\(a zip bomb\?\)"),
    "load_model: NaN in the optimizer state": FileCase(
        lambda f: _load(_variant(f, "image", lambda c: c["optimizer"].update(state={0: {"exp_avg": torch.tensor([float("nan")]),
                                                                                        "step": torch.tensor(1.0)}}),
                                 "nan-opt.pth")),
        resflows.CheckpointError, r"nan-opt.pth: its optimizer state holds NaN"),
    # load_toy_model
    "load_toy_model: NaN weights": FileCase(lambda f: _toy(_variant(f, "toy", _toy_nan, "toy-nan.pth")),
                                            resflows.CheckpointError, r"toy-nan.pth: its model weights hold NaN or infinite"),
    "load_toy_model: no weights": FileCase(lambda f: _toy(_variant(f, "toy", lambda c: c.pop("model"), "toy-nomodel.pth")),
                                           resflows.CheckpointError, r"toy-nomodel.pth: damaged train_toy.py checkpoint \(no 'model'\)"),
    "load_toy_model: a weight missing": FileCase(
        lambda f: _toy(_variant(f, "toy", lambda c: c["model"].pop(next(iter(c["model"]))), "toy-missing.pth")),
        resflows.CheckpointError, r"toy-missing.pth: its weights do not fit .*1 missing"),
    "load_toy_model: nblocks 10^8": FileCase(lambda f: _toy(_variant(f, "toy", _toy_set(nblocks=10**8), "toy-1e8.pth")),
                                             resflows.CheckpointError, r"toy-1e8.pth: its settings ask for 100000000 blocks"),
    "load_toy_model: dims 10^12": FileCase(lambda f: _toy(_variant(f, "toy", _toy_set(dims=[10**12]), "toy-wide.pth")),
                                           resflows.CheckpointError, r"toy-wide.pth: (cannot rebuild its model|its weights do not fit)"),
    "load_toy_model: bad config": FileCase(lambda f: _toy(_variant(f, "toy", _toy_set(coeff=3.0), "toy-coeff.pth")),
                                           resflows.CheckpointError, r"toy-coeff.pth: its stored settings are invalid: --coeff"),
    "load_toy_model: itr 10^30": FileCase(lambda f: _toy(_variant(f, "toy", lambda c: c.update(itr=10**30), "toy-itr.pth")),
                                          resflows.CheckpointError, r"toy-itr.pth: damaged or crafted checkpoint: .*integer of 100 bits"),
    "load_toy_model: a flipped byte": FileCase(lambda f: _toy(_flipped(f, "toy")), resflows.CheckpointError,
                                               r"flipped-toy.pth: .*Bad CRC-32"),
    "load_toy_model: a zip bomb": FileCase(lambda f: _toy(_bomb(f)), resflows.CheckpointError, r"bomb.pth: .*zip bomb"),
    "load_paper_checkpoint: a zip bomb": FileCase(lambda f: _paper(_bomb(f)), ValueError, r"\(a zip bomb\?\); refusing"),
    "load_paper_checkpoint: a flipped byte": FileCase(lambda f: _paper(_flipped(f, "paper")), ValueError,
                                                      r"the file is damaged: Bad CRC-32 for file"),
    "load_toy_model: an image checkpoint": FileCase(lambda f: _toy(f["image"]), resflows.CheckpointError,
                                                    r"image.pth: not a train_toy.py checkpoint"),
}


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_bad_checkpoint_argument_or_file_is_one_clear_error(name, files):
    case = FILE_CASES[name]
    with pytest.raises(case.error) as info:
        case.call(files)
    message = str(info.value)
    assert re.search(case.message, message), message
    assert "\n" not in message


def test_good_files_still_load(files):
    from resflows.toy import load_toy_model

    assert not resflows.load_model(files["image"], ema=True, map_location=torch.device("cpu")).training
    assert not load_toy_model(files["toy"]).training
