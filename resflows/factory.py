"""Factories shared by the scripts: a TrainConfig (the paper's flags) -> ModelConfig (build the model with
``ResidualFlow(model_config_from(cfg))``)."""
from __future__ import annotations

from .config import ModelConfig, TrainConfig, parse_int_tuple, parse_vnorms
from .datasets import get_spec

__all__ = ["model_config_from", "image_size", "nvals_of"]


def image_size(cfg: TrainConfig) -> int:
    """The image size actually used: forced for celebahq / celeba_5bit / imagenet (as the paper)."""
    return get_spec(cfg.data).resolve_size(cfg.imagesize)


def nvals_of(cfg: TrainConfig) -> int:
    """Number of pixel levels the data was quantised to (256, 32 for celeba_5bit, 2**nbits for celebahq, 17 digits)."""
    return get_spec(cfg.data).nvals(cfg.nbits)


def model_config_from(cfg: TrainConfig) -> ModelConfig:
    """The model the paper's train_img.py builds for these flags."""
    spec = get_spec(cfg.data)
    size = image_size(cfg)
    if cfg.task in ("classification", "hybrid") and cfg.data == "cifar10":
        init_layer = "normalize"  # the paper replaces the logit transform for CIFAR-10 classifiers
    elif cfg.logit_transform:
        init_layer = "logit"
    else:
        init_layer = None
    return ModelConfig(
        input_size=(spec.im_dim + cfg.padding, size, size),
        nblocks=parse_int_tuple(cfg.nblocks, "--nblocks"),
        block=cfg.block,
        idim=cfg.idim,
        squeeze_first=cfg.squeeze_first,
        factor_out=cfg.factor_out,
        quadratic=cfg.quadratic,
        init_layer=init_layer,
        logit_alpha=spec.logit_alpha,
        actnorm=cfg.actnorm,
        fc_actnorm=cfg.fc_actnorm,
        batchnorm=cfg.batchnorm,
        dropout=cfg.dropout,
        fc=cfg.fc,
        coeff=cfg.coeff,
        vnorms=parse_vnorms(cfg.vnorms),
        n_lipschitz_iters=cfg.n_lipschitz_iters,
        sn_tol=cfg.sn_tol,
        learn_p=cfg.learn_p,
        n_power_series=cfg.n_power_series,
        n_dist=cfg.n_dist,
        n_samples=cfg.n_samples,
        n_exact_terms=cfg.n_exact_terms,
        neumann_grad=cfg.neumann_grad,
        mem_eff=cfg.mem_eff,
        act=cfg.act,
        kernels=parse_int_tuple(cfg.kernels, "--kernels"),
        fc_end=cfg.fc_end,
        fc_idim=cfg.fc_idim,
        preact=cfg.preact,
        first_resblock=cfg.first_resblock,
        classification=cfg.task in ("classification", "hybrid"),
        n_classes=spec.n_classes,
        cdim=cfg.cdim,
        densenet=cfg.densenet,
        densenet_depth=cfg.densenet_depth,
        densenet_growth=cfg.densenet_growth,
        fc_densenet_growth=cfg.fc_densenet_growth,
        learnable_concat=cfg.learnable_concat,
        lip_coeff=cfg.lip_coeff,
    )
