"""Input checks of the public API: a wrong shape, dtype, device or value range is a ``ValueError`` that names
what was expected, instead of a raw torch error from deep inside a layer or a silently wrong number.

Shape, dtype and device checks read tensor metadata only and cost nothing. Value checks (finite, in [0, 1])
need a min/max over the tensor, which on a GPU waits for the device (a synchronisation), so models skip them
when ``model.check_values`` is False; the trainer sets that, since its data pipeline produces valid images.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["check_images", "check_latent", "check_bpd_args", "weight_of"]


def weight_of(model: torch.nn.Module) -> Optional[Tensor]:
    """A weight tensor of ``model`` (its dtype and device are the model's), or None. Scalar parameters do
    not count: the residual blocks' ``geom_p`` stays float64 in float32 models, as in the paper's code."""
    return next((p for p in model.parameters() if p.dim() > 0), None)


def _check_tensor(name: str, t, model: torch.nn.Module) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    p = weight_of(model)
    if p is None:
        return
    if t.dtype != p.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, but the model's parameters are {p.dtype}; pass "
                         f"{name}.to({p.dtype}) (or convert the model, e.g. model.double())")
    if t.device != p.device:
        raise ValueError(f"{name} is on {t.device}, but the model is on {p.device}; pass {name}.to('{p.device}')")


def _min_max(t: Tensor) -> Tuple[float, float]:
    lo, hi = torch.aminmax(t.detach())
    return float(lo), float(hi)  # one device synchronisation


def check_images(model, x) -> None:
    """``x`` must be a non-empty batch ``[B, C, H, W]`` of the model's ``input_size``, dtype and device; with
    ``model.check_values`` also finite and, for a model with the logit input layer, in [0, 1]."""
    c, h, w = model.config.input_size
    _check_tensor("x", x, model)
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise ValueError(f"x has shape {list(x.shape)}; this model expects images [B, {c}, {h}, {w}] "
                         f"(B >= 1, {c} channel{'s' if c != 1 else ''} of {h}x{w})")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (shape [0, ...]); pass at least one image")
    if not model.check_values:
        return
    lo, hi = _min_max(x)
    if model.config.init_layer == "logit":
        # logit(alpha + (1 - 2 alpha) x) is NaN outside about [0, 1]: the log-det would be NaN, silently.
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"x has values in [{lo:.4g}, {hi:.4g}]; this model expects dequantised images in "
                             "[0, 1] (its first layer is a logit transform)")
    elif not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"x has non-finite values (min {lo}, max {hi}); expected finite images")


def check_latent(model, z) -> None:
    """``z`` must be a non-empty batch ``[B, D]`` (or ``[B, ...]`` with D values an example) of the model's
    latent size, dtype and device; with ``model.check_values`` also finite."""
    _check_tensor("z", z, model)
    d = model.latent_dim
    if z.dim() < 2 or math.prod(z.shape[1:]) != d:
        raise ValueError(f"z has shape {list(z.shape)}; this model expects [B, {d}] (its latent has {d} dimensions)")
    if z.shape[0] == 0:
        raise ValueError("z is an empty batch (shape [0, ...]); pass at least one latent vector")
    if model.check_values:
        lo, hi = _min_max(z)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"z has non-finite values (min {lo}, max {hi}); the fixed-point inverse needs finite z")


def check_bpd_args(z, logdet, image_shape: Sequence[int], nvals, padding, logpu) -> Tuple[int, int, int]:
    """Checks :func:`resflows.bits_per_dim`'s arguments against each other; returns ``(C, H, W)``."""
    try:
        c, h, w = (int(s) for s in image_shape)
        ok = list(image_shape) == [c, h, w] and min(c, h, w) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {image_shape!r}")
    if not isinstance(nvals, (int, float)) or isinstance(nvals, bool) or not nvals >= 2:
        raise ValueError(f"nvals (the number of pixel levels, e.g. 256 for 8-bit images) must be >= 2, got {nvals!r}")
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise ValueError(f"padding (extra noise channels) must be an int >= 0, got {padding!r}")
    for name, t in (("z", z), ("logdet", logdet)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor, got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if z.dim() < 1 or z.shape[0] == 0:
        raise ValueError(f"z has shape {list(z.shape)}; expected a non-empty batch [B, D]")
    b, d = z.shape[0], (c + padding) * h * w
    if math.prod(z.shape[1:]) != d:
        pad = f" + {padding} padding channels" if padding else ""
        raise ValueError(f"z has {math.prod(z.shape[1:])} values an example, but image_shape {tuple(image_shape)}{pad} "
                         f"means {d}; pass the (C, H, W) of the images z came from")
    if tuple(logdet.shape) != (b,):
        raise ValueError(f"logdet has shape {list(logdet.shape)}; expected [{b}] (one value per example of z)")
    if logpu is not None and (not isinstance(logpu, Tensor) or tuple(logpu.shape) != (b,)):
        shape = list(logpu.shape) if isinstance(logpu, Tensor) else type(logpu).__name__
        raise ValueError(f"logpu has shape {shape}; expected [{b}] (one value per example of z)")
    return c, h, w
