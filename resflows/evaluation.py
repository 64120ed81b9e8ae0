"""Evaluating and sampling a trained image flow: test bits/dim and accuracy over a loader, sample grids
written to a file, and the converged power iterations a final evaluation uses.

Shared by the trainer (validation every epoch), ``train_img.py --evaluate / --sample`` and Python users of
:func:`resflows.load_model`. Under ``torchrun`` every rank calls these (the power iterations and the sums
are collective); rank 0 writes.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .datasets import get_spec
from .distributed import all_reduce_sum, broadcast_buffers
from .factory import image_size, nvals_of
from .layers.power import TIGHT_LIPSCHITZ
from .losses import LossOut, ModelForward, compute_loss
from .runlog import TrainingError, progress

__all__ = ["TIGHT_LIPSCHITZ", "SAMPLE_CHUNK", "image_shape", "tighten_lipschitz", "prepare_for_eval", "evaluate",
           "dequantization_bound", "draw_samples", "save_samples", "GRID_MIN_WIDTH", "grid_scale", "save_grid"]

logger = logging.getLogger("resflows")

SAMPLE_CHUNK = 64  # samples inverted at once: bounds the memory of the fixed-point iterations
BOUND_NAMES = {False: "single-sample", True: "importance-weighted"}  # eval.json's "bound", by K > 1


def image_shape(cfg: TrainConfig) -> Tuple[int, int, int]:
    """(C, H, W) of ``--data``'s images at ``--imagesize``, without ``--padding`` channels."""
    size = image_size(cfg)
    return (get_spec(cfg.data).im_dim, size, size)


def tighten_lipschitz(model) -> None:
    """Re-run every normalised layer's power iterations to convergence (:data:`TIGHT_LIPSCHITZ`)."""
    model.update_lipschitz(**TIGHT_LIPSCHITZ)


def prepare_for_eval(model):
    """``model`` in evaluation mode with its power iterations re-run for its current weights (the same on
    every rank)."""
    model.update_lipschitz()
    broadcast_buffers(model)
    return model.eval()


@torch.no_grad()
def evaluate(model, loader: Iterable, cfg: TrainConfig, device: Optional[torch.device] = None, show_progress: bool = True,
             label: Optional[int] = None) -> Dict[str, Any]:
    """Test bits/dim (mean, standard error, count) over every image of ``loader`` (summed over the ranks);
    accuracy and cross-entropy for the classification / hybrid tasks of ``cfg``. Logs one line."""
    device = device or next(model.parameters()).device
    shape, nvals = image_shape(cfg), nvals_of(cfg)
    k_samples = cfg.eval_dequant_samples
    model.eval()
    # n, sum bpd, sum bpd^2, correct, xent, and with --var-deq the sums of log q / (D ln 2) and of its square
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    t0 = time.time()
    for x, y in progress(loader, show_progress, desc="validate"):
        x, y = x.to(device), y.to(device)
        if k_samples > 1:
            out = dequantization_bound(model, x, y, cfg, shape, nvals, k_samples)
        else:
            out = compute_loss(ModelForward(model), x, y, cfg, shape, nvals)
        sums[0] += x.shape[0]
        if out.bpd is not None:
            sums[1] += out.bpd.double().sum()
            sums[2] += (out.bpd.double() ** 2).sum()
        if out.logits is not None:
            sums[3] += (out.logits.argmax(1) == y).double().sum()
            sums[4] += F.cross_entropy(out.logits, y, reduction="sum").double()
        if out.logq is not None:
            q_bpd = out.logq.double() / (math.prod(shape) * math.log(2))
            sums[5] += q_bpd.sum()
            sums[6] += (q_bpd**2).sum()
    sums = all_reduce_sum(sums)
    n = int(sums[0].item())
    res: Dict[str, Any] = {"n_images": n, "seconds": time.time() - t0}
    if cfg.task != "classification":
        mean = sums[1].item() / n
        var = max(sums[2].item() / n - mean**2, 0.0) * n / max(n - 1, 1)
        res.update(test_bpd=mean, test_bpd_stderr=math.sqrt(var / n))
        res.update(dequant_samples=k_samples, bound=BOUND_NAMES[k_samples > 1])
    if cfg.var_deq and k_samples == 1:
        # The two parts of the single-sample bound: -log p(x + u) and log q(u | x), in bits/dim (bpd = flow + q).
        q_mean = sums[5].item() / n
        res.update(test_logq_bpd=q_mean, test_flow_bpd=res["test_bpd"] - q_mean)
    if cfg.task != "density":
        res.update(test_acc=sums[3].item() / n, test_crossent=sums[4].item() / n)
    msg = f"epoch {label} | test" if label is not None else "test"
    if "test_bpd" in res:
        msg += f" bits/dim {res['test_bpd']:.4f} +- {res['test_bpd_stderr']:.4f}"
    if "test_acc" in res:
        msg += f" acc {res['test_acc']:.4f}"
    logger.info("%s (%d images, %.1f s)", msg, n, res["seconds"])
    return res


def dequantization_bound(model, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, shape: Tuple[int, int, int], nvals: int,
                         k_samples: int) -> LossOut:
    """Per-image bits/dim of the importance-weighted bound ``log (1/K) sum_k p(x + u_k) / q(u_k | x)`` (Burda et al.
    2016), ``u_k`` drawn from the model's q(u | x) (``--var-deq``) or uniform (then q = 1), for noise-free images
    ``x``. It never decreases with K and tends to log P(x); K = 1 is the single-sample bound."""
    forward = ModelForward(model)
    log_w = []
    d_ln2 = math.prod(shape) * math.log(2)
    for _ in range(k_samples):
        xk = x if cfg.var_deq else ((nvals - 1) * x + torch.rand_like(x)) / nvals
        # compute_loss's bits/dim is -log w_k / (D ln 2), log w_k = log p(x + u_k) - D log nvals - log q(u_k | x).
        log_w.append(-compute_loss(forward, xk, y, cfg, shape, nvals).bpd.double() * d_ln2)
    bound = torch.logsumexp(torch.stack(log_w), 0) - math.log(k_samples)
    return LossOut(loss=x.new_zeros(()), bpd=-bound / d_ln2)


@torch.no_grad()
def draw_samples(model, n: int, temp: float, channels: int, device: Optional[torch.device] = None,
                 chunk: int = SAMPLE_CHUNK) -> torch.Tensor:
    """``n`` images ``x = f^{-1}(z)``, ``z ~ N(0, temp^2 I)``, clamped to [0, 1], on the CPU; ``channels``
    drops the ``--padding`` ones. Raises :class:`TrainingError` when the inverse diverges."""
    device = device or next(model.parameters()).device
    chunks = []
    for i in range(0, n, chunk):
        z = torch.randn(min(chunk, n - i), model.latent_dim, device=device) * temp
        x = model.inverse(z)[:, :channels]
        if not torch.isfinite(x).all():
            raise TrainingError(f"sampling at --temp {temp:g} gave non-finite images (the inverse diverged); "
                                f"nothing was written. Try a lower --temp or an earlier checkpoint")
        chunks.append(x.clamp(0, 1).cpu())
    return torch.cat(chunks)


GRID_MIN_WIDTH = 512  # pixels: grids of small images are enlarged (nearest neighbour) to at least this width


def grid_scale(width: int, ncols: int, min_width: int = GRID_MIN_WIDTH) -> int:
    """The integer factor that makes ``ncols`` images of ``width`` pixels at least ``min_width`` wide (1: as is)."""
    return max(1, math.ceil(min_width / max(1, width * ncols)))


def save_grid(images: torch.Tensor, path: str, nrow: int, min_width: int = GRID_MIN_WIDTH) -> int:
    """``images`` [N, C, H, W] in [0, 1] as a PNG grid of ``nrow`` columns, each image enlarged by nearest
    neighbour (an integer factor, so every pixel stays a sharp square) until the rows are at least ``min_width``
    pixels wide; returns the factor. (An 8x8 digit is unreadable at 8 pixels; a 64x64 image is left as is.)"""
    from torchvision.utils import save_image

    scale = grid_scale(images.shape[-1], min(nrow, images.shape[0]), min_width)
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    save_image(images, path, nrow=nrow, padding=2 * scale)
    return scale


def save_samples(model, n: int, temp: float, folder: str, channels: int, nrow: Optional[int] = None,
                 device: Optional[torch.device] = None) -> str:
    """A PNG grid of :func:`draw_samples` at ``folder/samples_n{n}_t{temp}.png`` (enlarged to at least
    :data:`GRID_MIN_WIDTH` pixels, see :func:`save_grid`); returns its path."""
    images = draw_samples(model, n, temp, channels, device)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"samples_n{n}_t{temp:g}.png")
    save_grid(images.cpu(), path, nrow=nrow or max(int(math.sqrt(n)), 1))
    return path
