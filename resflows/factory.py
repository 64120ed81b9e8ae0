"""Factories shared by the scripts: a TrainConfig (the paper's flags) -> ModelConfig (build the model with
``ResidualFlow(model_config_from(cfg))``)."""
from __future__ import annotations

import dataclasses

from .config import ModelConfig, TrainConfig
from .datasets import get_spec

__all__ = ["model_config_from", "image_size", "nvals_of"]


def image_size(cfg: TrainConfig) -> int:
    """The image size actually used: forced for celebahq / celeba_5bit / imagenet (as the paper)."""
    return get_spec(cfg.data).resolve_size(cfg.imagesize)


def nvals_of(cfg: TrainConfig) -> int:
    """Number of pixel levels the data was quantised to (256, 32 for celeba_5bit, 2**nbits for celebahq, 17 digits)."""
    return get_spec(cfg.data).nvals(cfg.nbits)


def model_config_from(cfg: TrainConfig) -> ModelConfig:
    """The model the paper's train_img.py builds for these flags: ModelConfig's fields that TrainConfig holds
    (under the same names; the strings ``16-16-16``, ``3-1-3``, ``2222`` are parsed by ModelConfig), plus the
    ones the data and task decide."""
    spec = get_spec(cfg.data)
    size = image_size(cfg)
    if cfg.task in ("classification", "hybrid") and cfg.data == "cifar10":
        init_layer = "normalize"  # the paper replaces the logit transform for CIFAR-10 classifiers
    elif cfg.logit_transform:
        init_layer = "logit"
    else:
        init_layer = None
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name in train_fields}
    return ModelConfig(
        **shared,
        input_size=(spec.im_dim + cfg.padding, size, size),
        init_layer=init_layer,
        logit_alpha=spec.logit_alpha,
        classification=cfg.task in ("classification", "hybrid"),
        n_classes=spec.n_classes,
    )
