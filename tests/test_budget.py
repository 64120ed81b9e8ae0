"""The memory estimate from the flags (resflows/budget.py): exact parameter counts without building the model,
and refusals in one line naming the estimate."""
from __future__ import annotations

import pytest
import torch

from resflows.budget import (
    MAX_BLOCKS,
    MemoryBudgetError,
    check_image_model,
    check_image_run,
    check_toy_model,
    image_model_numel,
    memory_limit,
    toy_model_numel,
)
from resflows.config import ModelConfig, TrainConfig
from resflows.factory import model_config_from
from resflows.model import ResidualFlow
from resflows.toy import ToyConfig, build_toy_model


def _numel(module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


@pytest.mark.parametrize("flags", [
    dict(data="digits", nblocks="3-2", idim=8, fc_idim=16),
    dict(data="digits", nblocks="2-3", idim=8, fc_idim=16, task="hybrid", learn_p=True),
    dict(data="mnist", imagesize=16, nblocks="2-2", idim=8, fc_idim=16, factor_out=True, squeeze_first=True, quadratic=True),
    dict(data="digits", nblocks="2-2", densenet=True, densenet_depth=2, densenet_growth=8, fc_densenet_growth=4, act="CLipSwish"),
    dict(data="digits", nblocks="2-2", block="coupling", idim=8, fc_idim=16, batchnorm=True),
])
def test_image_parameter_count_is_exact(flags):
    mc = model_config_from(TrainConfig(**flags))
    assert image_model_numel(mc) == _numel(ResidualFlow(mc))


@pytest.mark.parametrize("flags", [dict(nblocks=3, dims="8-8"), dict(nblocks=2, arch="realnvp", dims="8", actnorm=True, batchnorm=True),
                                   dict(nblocks=3, dims="4-4", learn_p=True)])
def test_toy_parameter_count_is_exact(flags):
    cfg = ToyConfig(**flags)
    assert toy_model_numel(cfg) == _numel(build_toy_model(cfg))


def test_refusals_name_the_estimate_and_the_flag(monkeypatch):
    with pytest.raises(MemoryBudgetError, match=r"need at least .* TB of memory \(parameters .*use fewer --nblocks"):
        check_image_run(TrainConfig(data="digits", nblocks="2-2", fc_idim=10**7))
    with pytest.raises(MemoryBudgetError, match=r"use a smaller --sample"):
        check_image_run(TrainConfig(data="digits", nblocks="2-2", resume="c.pth", sample=10**12))
    with pytest.raises(MemoryBudgetError, match=rf"asks for {MAX_BLOCKS + 1} blocks"):
        check_image_model(ModelConfig(input_size=(1, 8, 8), nblocks=(MAX_BLOCKS,), fc_nblocks=1, idim=1))
    with pytest.raises(MemoryBudgetError, match=r"asks for 100000000 blocks"):
        check_toy_model(ToyConfig(nblocks=10**8))
    check_image_run(TrainConfig(data="digits", nblocks="2-2"))  # the demo's size fits
    monkeypatch.setenv("RESFLOWS_MEMORY_LIMIT_GB", "0.0001")
    assert memory_limit("cpu") == (100000, "RESFLOWS_MEMORY_LIMIT_GB allows")
    with pytest.raises(MemoryBudgetError, match=r"more than the 100 kB RESFLOWS_MEMORY_LIMIT_GB allows"):
        check_image_run(TrainConfig(data="digits", nblocks="2-2"))


def test_overflowing_sizes_are_refused_not_raised():
    """fc_idim 10^12: torch cannot even describe the storage ("Storage size calculation overflowed")."""
    with pytest.raises(MemoryBudgetError):
        check_image_model(model_config_from(TrainConfig(data="digits", nblocks="1-1", fc_idim=10**12)))


def test_grids_are_enlarged_to_be_seen(tmp_path):
    from PIL import Image

    from resflows.evaluation import save_grid

    assert save_grid(torch.rand(64, 1, 8, 8), str(tmp_path / "a.png"), 8) == 8
    assert Image.open(tmp_path / "a.png").size[0] >= 512
    assert save_grid(torch.rand(64, 3, 64, 64), str(tmp_path / "b.png"), 8) == 1  # already large: as is
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 0, 0] = 1.0
    save_grid(img, str(tmp_path / "c.png"), 1)  # nearest neighbour: one source pixel becomes a 64-pixel square (512 / 8)
    a = torch.tensor(list(Image.open(tmp_path / "c.png").convert("L").getdata())).reshape(Image.open(tmp_path / "c.png").size[::-1])
    pad = 0  # torchvision puts no border around a grid of one image
    assert (a[pad:pad + 64, pad:pad + 64] == 255).all() and (a[pad + 64:pad + 128, pad:pad + 64] == 0).all()
