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
