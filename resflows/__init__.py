"""resflows: Residual Flows for Invertible Generative Modeling (Chen et al., NeurIPS 2019) in PyTorch.

Public API::

    model = resflows.load_model("checkpoint.pth", ema=True)   # ours or the paper's checkpoints
    z, logdet = model(x)                                      # x in [0, 1], shape [B, C, H, W]
    bpd = resflows.bits_per_dim(z, logdet, (C, H, W), nvals=256)
    x = model.inverse(z)
"""
from .checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from .config import ConfigError, ModelConfig, TrainConfig
from .exact import exact_logdet
from .losses import bits_per_dim, standard_normal_logprob
from .model import ResidualFlow

__version__ = "0.1.0"

__all__ = [
    "ResidualFlow",
    "ModelConfig",
    "TrainConfig",
    "ConfigError",
    "CheckpointError",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "bits_per_dim",
    "standard_normal_logprob",
    "exact_logdet",
]
