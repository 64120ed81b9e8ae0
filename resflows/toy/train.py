"""The training loop of ``train_toy.py``: fresh toy samples every step, NLL in nats, a Lipschitz update after
every optimiser step, validation on a fixed test set with exact 2-D log-dets, figures and checkpoints.

Shares with the image trainer what :mod:`resflows.runlog` holds (the ``resflows`` logger, progress bars,
stop signals, the non-finite-step rule); checkpoints are written atomically with ``resflows.checkpoint.atomic_save`` in a safe format
(``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, Optional

import torch

from ..checkpoint import CheckpointError, NonFiniteError, atomic_save, nonfinite_tensors
from ..checkpoint_checks import check_fit_on_meta
from ..flags import ConfigError
from ..layers.lipschitz import norm_order_gradients
from ..layers.power import TOY_VALIDATION_ITERATIONS
from ..layers.precision import branch_dtype
from ..losses import standard_normal_logprob
from ..runlog import progress, skipped_nonfinite_step
from ..runtime import compute_dtype, full_float32
from .config import ToyConfig
from .data import data_rng, sample, sample_tensor
from .model import ToyFlow, build_toy_model
from .viz import DEFAULT_CHUNK, eval_mode, grid_log_density, log_density, sample_model, save_figure

__all__ = ["ToyTrainer", "prepare_runtime", "TOY_FORMAT", "load_toy_checkpoint", "load_toy_model", "VIZ_DATA_SAMPLES"]

logger = logging.getLogger("resflows")

TOY_FORMAT = "resflows-toy"
TOY_FORMAT_VERSION = 1
VIZ_DATA_SAMPLES = 20000  # points in the data histogram (the paper's figure)


def prepare_runtime(device: torch.device) -> None:
    """Process settings for training on ``device``: on CPU, flushed denormals and glibc's allocator kept from
    returning freed activation buffers (:func:`resflows.runtime.tune_cpu_runtime`, as ``train_img.py``)."""
    if device.type == "cpu":
        from ..runtime import tune_cpu_runtime

        tune_cpu_runtime()


class ToyTrainer:
    """One ``train_toy.py`` run. ``fit`` reads top to bottom: ``run_step`` (loss, backward, step, Lipschitz
    update), then ``validate`` / ``visualize`` / ``save`` at their frequencies."""

    def __init__(self, cfg: ToyConfig, model: ToyFlow, device: torch.device, save_dir: str,
                 chunk_size: int = DEFAULT_CHUNK):
        self.cfg, self.device, self.save_dir, self.chunk_size = cfg, device, save_dir, chunk_size
        self.model = model.to(device)
        # Adam with torch's default betas (0.9, 0.999), as the paper's toy script; weight decay decoupled.
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.train_rng = data_rng(cfg.seed, "train")
        # A fixed test set (the paper drew a fresh one at every validation): test losses compare across iterations.
        self.test_x = sample_tensor(cfg.data, cfg.test_batch_size, data_rng(cfg.seed, "test"), device)
        viz_rng = data_rng(cfg.seed, "viz")
        self.viz_data = sample(cfg.data, VIZ_DATA_SAMPLES, viz_rng)
        self.viz_seed = int(viz_rng.integers(2**31))  # the same latent codes in every figure
        self.itr = 0
        self.best_test_loss = math.inf
        self.last_test_loss: Optional[float] = None
        self.history: Dict[str, list] = {"train_loss": [], "test_loss": []}  # (itr, value), for tests and tooling
        self.stop_signal: Optional[str] = None  # set by resflows.runlog.stop_on_signals
        self.nonfinite_in_a_row = 0
        self.writer = None
        self._avg: Dict[str, float] = {}

    # -- pieces ------------------------------------------------------------------------------------
    def open_writer(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(self.save_dir, "tb"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def beta(self) -> float:
        """Weight of the log-det, annealed linearly to 1 over ``--annealing-iters``."""
        a = self.cfg.annealing_iters
        return min(1.0, self.itr / a) if a > 0 else 1.0

    def compute_loss(self, x: torch.Tensor, beta: float = 1.0) -> Dict[str, torch.Tensor]:
        """Mean negative log-likelihood in nats: ``-mean(log N(f(x)) + beta * log|det df/dx|)``."""
        z, logdet = self.model(x)
        logpz = standard_normal_logprob(z).sum(1)
        return {"loss": -(logpz + beta * logdet).mean(), "logpz": logpz.mean(), "logdet": logdet.mean()}

    def run_step(self) -> Optional[Dict[str, float]]:
        """One optimiser step on a fresh batch; a non-finite loss or gradient skips the step."""
        self.model.train()
        self.itr += 1
        x = sample_tensor(self.cfg.data, self.cfg.batch_size, self.train_rng, self.device)
        with branch_dtype(compute_dtype(self.cfg.precision)):  # --precision bf16: the branches in bfloat16
            out = self.compute_loss(x, self.beta())
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # One host synchronisation for all the checks (not one per parameter).
        finite = bool(torch.stack([torch.isfinite(out["loss"])] + [torch.isfinite(g).all() for g in grads]).all())
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row = skipped_nonfinite_step(self.nonfinite_in_a_row, self.itr,
                                                             "try a lower --lr or a smaller --coeff")
            return None
        self.nonfinite_in_a_row = 0
        if self.cfg.learn_p:
            norm_order_gradients(self.model)  # the orders' own objective (they do not enter the loss)
        self.optimizer.step()
        self.model.update_lipschitz()  # power iterations for the new weights (Sec. 3.4)
        return {k: float(v.detach()) for k, v in out.items()}

    @torch.no_grad()
    @full_float32()
    def validate(self) -> float:
        """Test NLL (nats) on the fixed test set, exact 2-D log-dets (evaluation mode), in chunks, after 200
        power iterations whose vectors training then continues from (as the paper's toy script)."""
        self.model.update_lipschitz(n_iterations=TOY_VALIDATION_ITERATIONS)
        with eval_mode(self.model):
            loss = float(-log_density(self.model, self.test_x, self.chunk_size).mean())
        self.last_test_loss = loss
        self.history["test_loss"].append((self.itr, loss))
        return loss

    @torch.no_grad()
    @full_float32()
    def visualize(self) -> str:
        """``SAVE/figs/{itr:04d}.png``: data histogram, model density on the grid, histogram of model samples."""
        cfg = self.cfg
        npts = cfg.viz_npts
        n_samples = cfg.viz_samples if cfg.viz_samples is not None else npts * npts
        with eval_mode(self.model):
            log_px = grid_log_density(self.model, npts, self.chunk_size, device=self.device)
            gen = torch.Generator().manual_seed(self.viz_seed)
            samples = sample_model(self.model, n_samples, self.chunk_size, gen, self.device)
        folder = os.path.join(self.save_dir, "figs")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{self.itr:04d}.png")
        title = f"{cfg.data}, {cfg.arch}, iteration {self.itr}"
        return save_figure(path, self.viz_data, log_px.cpu().double().numpy(), samples.cpu().numpy(), npts, title)

    def state(self) -> Dict[str, Any]:
        """The checkpoint: plain types, tensors and state_dicts only (loads with ``weights_only=True``)."""
        return {
            "format": TOY_FORMAT,
            "format_version": TOY_FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "itr": self.itr,
            "best_test_loss": self.best_test_loss if math.isfinite(self.best_test_loss) else None,
            "test_loss": self.last_test_loss,
        }

    def save(self, name: str = "checkpt.pth") -> str:
        path = os.path.join(self.save_dir, name)
        atomic_save(self.state(), path)
        return path

    # -- logging ---------------------------------------------------------------------------------------
    def _running(self, m: Dict[str, float], momentum: float = 0.93) -> Dict[str, float]:
        # Running averages as the paper's RunningAverageMeter(0.93).
        for k, v in m.items():
            self._avg[k] = v if k not in self._avg else self._avg[k] * momentum + v * (1 - momentum)
        return self._avg

    def log_step(self, m: Dict[str, float], seconds: float) -> None:
        avg = self._running({**m, "time": seconds})
        self.history["train_loss"].append((self.itr, m["loss"]))
        if self.itr % self.cfg.log_freq and self.itr != 1:
            return
        logger.info("Iter %04d | Time %.4f(%.4f) | Loss %.6f(%.6f) | Logpz %.6f(%.6f) | Logdet %.6f(%.6f)",
                    self.itr, seconds, avg["time"], m["loss"], avg["loss"], m["logpz"], avg["logpz"], m["logdet"], avg["logdet"])
        if self.writer:
            w, s = self.writer, self.itr
            w.add_scalar("train/loss", m["loss"], s)
            w.add_scalar("train/logpz", m["logpz"], s)
            w.add_scalar("train/logdet", m["logdet"], s)
            w.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], s)
            w.add_scalar("train/beta", self.beta(), s)

    def log_validation(self, loss: float, improved: bool) -> None:
        lips = list(self.model.lipschitz_constants().values())
        msg = f"[TEST] Iter {self.itr:04d} | Test Loss {loss:.6f} | best {self.best_test_loss:.6f}"
        if lips:
            msg += f" | Lipschitz min {min(lips):.4f} mean {sum(lips) / len(lips):.4f} max {max(lips):.4f}"
        logger.info(msg + (" | saved checkpt.pth" if improved else ""))
        if self.cfg.learn_p:
            orders = self.model.norm_orders()
            first_block = list(orders.values())[: self.cfg.n_linear]
            logger.info("norm orders: %s (first block)", ", ".join(f"{d:.2f}->{c:.2f}" for d, c in first_block))
        if self.writer:
            w, s = self.writer, self.itr
            w.add_scalar("test/loss", loss, s)
            if lips:
                w.add_scalar("lipschitz/min", min(lips), s)
                w.add_scalar("lipschitz/mean", sum(lips) / len(lips), s)
                w.add_scalar("lipschitz/max", max(lips), s)

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        bar = progress(range(self.itr + 1, cfg.niters + 1), True, desc="train", total=cfg.niters - self.itr)
        start = time.time()
        for itr in bar:
            t0 = time.time()
            m = self.run_step()
            if m is not None:
                self.log_step(m, time.time() - t0)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{self._avg['loss']:.3f}", refresh=False)
            if itr % cfg.val_freq == 0 or itr == cfg.niters:
                loss = self.validate()
                improved = loss < self.best_test_loss
                if improved:
                    self.best_test_loss = loss
                    self.save("checkpt.pth")
                self.log_validation(loss, improved)
            if itr == 1 or itr % cfg.viz_freq == 0:
                path = self.visualize()
                logger.info("wrote %s", path)
            if self.stop_signal:
                logger.info("received %s: saving %s and stopping", self.stop_signal, os.path.join(self.save_dir, "last.pth"))
                break
        self.save("last.pth")
        logger.info("finished at iteration %d in %.1f min; best test loss %.6f nats", self.itr, (time.time() - start) / 60,
                    self.best_test_loss)


# ------------------------------------------------------------------------------------------------
# Reading checkpoints back
# ------------------------------------------------------------------------------------------------
def load_toy_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """A ``train_toy.py`` checkpoint as a dict (``torch.load(weights_only=True)``), checked before any of it
    is used: the zip archive (declared sizes, CRC-32s), the structure (depth, key and value types), the
    config (the command line's rules), the counters, and that the weights and optimiser state are finite
    named tensors. Anything wrong is a :class:`CheckpointError` naming the file."""
    import zipfile

    from ..legacy import NotACheckpointError, check_structure, check_zip_archive

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if not zipfile.is_zipfile(path):
            raise NotACheckpointError("it is not a torch zip archive (truncated, or not a checkpoint)")
        check_zip_archive(path)
    except NotACheckpointError as e:
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from None
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != TOY_FORMAT:
        raise CheckpointError(f"{path}: not a train_toy.py checkpoint")
    try:
        check_structure(ckpt)
    except NotACheckpointError as e:
        raise CheckpointError(f"{path}: damaged or crafted checkpoint: {e}") from None
    for key in ("config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: damaged train_toy.py checkpoint (no {key!r})")
    if not isinstance(ckpt["config"], dict) or not all(isinstance(k, str) for k in ckpt["config"]):
        raise CheckpointError(f"{path}: damaged checkpoint (its 'config' is not a dict of settings)")
    try:
        ckpt["config"] = ToyConfig.from_dict(ckpt["config"]).to_dict()
    except (ConfigError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path}: its stored settings are invalid: {e}") from None
    itr = ckpt.get("itr")
    if itr is not None and (not isinstance(itr, int) or isinstance(itr, bool) or not 0 <= itr <= 10**12):
        raise CheckpointError(f"{path}: damaged checkpoint (its itr counter is {itr!r:.40}, not an integer in [0, 10^12])")
    sd = ckpt["model"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: damaged checkpoint (its 'model' weights are not a dict of named tensors)")
    for what, obj in (("model weights", sd), ("optimizer state", ckpt.get("optimizer"))):
        bad = nonfinite_tensors(obj) if obj is not None else []
        if bad:
            raise NonFiniteError(f"{path}: its {what} hold NaN or infinite values ({len(bad)} tensor(s), first: "
                                 f"{bad[0]}); use an earlier checkpoint")
    return ckpt


def load_toy_model(path: str, map_location: Any = "cpu") -> ToyFlow:
    """The model of a ``train_toy.py`` checkpoint, rebuilt from its config, in evaluation mode.

    The weights are compared key by key and shape by shape with the model the config describes, built on
    the ``meta`` device (after a count that rejects absurd block numbers), before the model is built."""
    ckpt = load_toy_checkpoint(path, map_location)
    cfg = ToyConfig.from_dict(ckpt["config"])
    sd = ckpt["model"]
    check_fit_on_meta(path, {"model": sd}, cfg.nblocks * (2 if cfg.arch == "realnvp" else 1), lambda: build_toy_model(cfg))
    model = build_toy_model(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = "; ".join(s.strip() for s in str(e).strip().splitlines()[:2])
        raise CheckpointError(f"{path}: its weights do not fit this architecture ({detail})") from None
    return model.to(map_location).eval()
