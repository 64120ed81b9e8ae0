"""Models from checkpoints: :func:`load_model` (the public API) and :func:`load_weights` (a run's model and EMA),
with the architecture taken from the file (:func:`resflows.checkpoint.read_checkpoint`)."""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from .checkpoint import CheckpointError, read_checkpoint
from .config import ConfigError, ModelConfig
from .optim import EMA

__all__ = ["load_model", "load_weights", "load_state", "check_load_arguments"]


def _build(path: str, ckpt: Dict[str, Any]):
    from .model import ResidualFlow

    try:
        mcfg = ModelConfig.from_dict(ckpt["model_config"])
        return ResidualFlow(mcfg)
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from None


def load_state(path: str, model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the file.

    Two entries are taken from ``model`` instead of the file, as the paper's code does: ``last_n_samples``
    when ``--n-samples`` changed (a record of the last draws, sized by it), and the constant Normalize
    statistics that checkpoints written before they became state lack.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    for k, v in own.items():
        if k.endswith("last_n_samples") and k in state_dict and state_dict[k].shape != v.shape:
            state_dict[k] = v
        elif k.endswith((".mean", ".std")) and k not in state_dict and k.startswith(("init_layer.", "transforms.0.chain.0.")):
            state_dict[k] = v
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = "; ".join(s.strip() for s in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(f"{path}: its {what} weights do not fit this architecture ({detail})") from None


def load_model(path: str, ema: bool = False, map_location: Any = "cpu"):
    """The model stored in a checkpoint (ours or the paper's), in eval mode, architecture taken from the file.

    With ``ema=True`` the exponential-moving-average weights are used and every normalised layer's
    power-iteration vectors are re-estimated to convergence for those weights.

    Bad arguments raise ``ValueError`` naming the argument: ``path`` must be a file name (``str`` or
    ``os.PathLike``), ``ema`` a bool, ``map_location`` a device that exists here (``"cpu"``, ``"cuda:0"``, a
    ``torch.device``), a dict or a callable as for ``torch.load``, or None.
    """
    path = check_load_arguments(path, ema, map_location)
    ckpt = read_checkpoint(path, map_location)
    model = _build(path, ckpt)
    if ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: has no EMA weights; load it with ema=False")
        load_state(path, model, ckpt["ema"], "EMA")
    else:
        load_state(path, model, ckpt["model"])
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    if ema:
        from .evaluation import tighten_lipschitz

        tighten_lipschitz(model)
    return model.eval()


def check_load_arguments(path: Any, ema: Any, map_location: Any) -> str:
    """``load_model``'s argument checks; returns ``path`` as a string."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise ValueError(f"path must be a checkpoint file name (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty checkpoint file name")
    if not isinstance(ema, bool):
        raise ValueError(f"ema must be True or False, got {ema!r:.40}")
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return path
    if not isinstance(map_location, (str, torch.device)):
        raise ValueError(f"map_location must be a device such as 'cpu' or 'cuda:0', got {type(map_location).__name__}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"map_location must be a device such as 'cpu' or 'cuda:0', got {map_location!r:.40}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"map_location {map_location!r}: no CUDA GPU is available here; use 'cpu'")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"map_location {map_location!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type not in ("cpu", "mps"):
        raise ValueError(f"map_location must be 'cpu' or a CUDA device, got {map_location!r:.40}")
    return path


def load_weights(path: str, ckpt: Dict[str, Any], model: torch.nn.Module) -> EMA:
    """Load a checkpoint's weights into ``model`` and return the EMA: the checkpoint's EMA weights, or a copy
    of ``model`` where it has none."""
    load_state(path, model, ckpt["model"])
    ema = EMA(model)
    if ckpt.get("ema") is not None:
        load_state(path, ema.model, ckpt["ema"], "EMA")
    return ema
