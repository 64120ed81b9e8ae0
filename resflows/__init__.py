"""resflows: Residual Flows for Invertible Generative Modeling (Chen et al., NeurIPS 2019) in PyTorch.

Public API::

    model = resflows.load_model("checkpoint.pth", ema=True)   # ours or the paper's checkpoints
    z, logdet = model(x)                                      # x in [0, 1], shape [B, C, H, W]
    bpd = resflows.bits_per_dim(z, logdet, (C, H, W), nvals=256)
    x = model.inverse(z)

The names below are imported on first use (PEP 562), so ``import resflows.layers`` loads the layers
and torch only, not the checkpoint, config and training modules.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "ResidualFlow": "model",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "ConfigError": "config",
    "CheckpointError": "checkpoint",
    "load_model": "loading",
    "read_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "bits_per_dim": "losses",
    "standard_normal_logprob": "losses",
    "exact_logdet": "exact",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
