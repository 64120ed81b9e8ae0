"""The training loop for image Residual Flows.

``Trainer`` owns one training run: the model (wrapped in DistributedDataParallel under ``torchrun``), its EMA
copy, the optimiser and LR schedule, the data loaders, checkpoints and logs. Construction leaves it ready to
train (data built, weights restored or ActNorm initialised, model wrapped); the loop reads top to bottom in
``fit``: ``train_epoch`` -> ``forward_backward`` -> ``optimize`` (clip, step, Lipschitz update, EMA) ->
``log_step``, with ``validate`` / ``save`` every epoch.

The pieces live beside it: the loss in :mod:`resflows.losses`, optimiser, schedule and EMA in
:mod:`resflows.optim`, loaders in :mod:`resflows.loaders`, evaluation and sampling in
:mod:`resflows.evaluation`, logging, progress bars and signals in :mod:`resflows.runlog`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, nonfinite_tensors, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, TrainConfig
from .distributed import DistInfo, all_reduce_mean, barrier, broadcast_buffers, is_distributed, rank_seed
from .entry import best_checkpoint_name, remove_own_file
from .evaluation import evaluate, image_shape, prepare_for_eval, save_grid
from .factory import nvals_of
from .layers.lipschitz import norm_order_gradients
from .layers.precision import branch_dtype
from .loaders import RunData, build_data
from .loading import load_weights
from .losses import ModelForward, compute_loss
from .model import ResidualFlow
from .optim import EMA, LRSchedule, make_optimizer, paper_optimizer_state
from .runlog import TrainingError, progress, skipped_nonfinite_step
from .runtime import compute_dtype, full_float32

__all__ = ["Trainer", "KEEP_BEST", "GRAD_CLIP_NORM", "run_finished"]

logger = logging.getLogger("resflows")

KEEP_BEST = 5  # checkpt-EPOCH.pth files kept: the lowest test bits/dim
GRAD_CLIP_NORM = 1.0  # gradient norm clipped to, as the paper's train_img.py (hard-coded there too)
# Re-seeding when a checkpoint's random streams do not fit the number of ranks: each rank takes the stream
# that seed + RESEED_STRIDE * (step + 1) gives it (resflows.distributed.rank_seed), a prime stride, so that the
# streams of different steps and ranks do not coincide.
RESEED_STRIDE = 7919
VIS_SEED_OFFSET = 12345  # the fixed latents of the visualisation grid: a stream apart from training's
VIS_IMAGES = 8  # images per row of the visualisation grid (real, samples, reconstructions)


def _check_compile(device: torch.device) -> None:
    from .layers.compiled import CompileUnavailable, check_compile_available

    try:
        check_compile_available(device)
    except CompileUnavailable as e:
        raise TrainingError(f"--compile True cannot work here: {e}; run with --compile False") from None


class Trainer:
    """One training run for ``train_img.py``, complete once constructed.

    ``data`` defaults to :func:`resflows.loaders.build_data` on ``cfg``. With ``ckpt`` (a
    :func:`resflows.checkpoint.read_checkpoint` dict, read from ``ckpt_path``) the weights, EMA, optimiser,
    counters and random streams continue from it; without, ActNorm is initialised on a first training batch.
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, model: ResidualFlow, save_dir: str,
                 ckpt: Optional[Dict[str, Any]] = None, ckpt_path: str = "the checkpoint", data: Optional[RunData] = None):
        self.cfg, self.dist, self.save_dir = cfg, dist_info, save_dir
        self.device = dist_info.device
        if cfg.compile:
            _check_compile(self.device)
        self.model = model.to(self.device)
        self.model.check_values = False  # the data are valid images; a min/max would sync the GPU every step
        self.model.set_inverse_method(cfg.inverse)  # monotone blocks use it in every solve, training included
        self.image_shape = image_shape(cfg)
        self.nvals = nvals_of(cfg)
        self.optimizer = make_optimizer(cfg, self.model.parameters())
        self.schedule = LRSchedule(cfg)
        data = data if data is not None else build_data(cfg, dist_info, train=True)
        self.train_set, self.sampler, self.train_loader = data.train_set, data.sampler, data.train_loader
        self.test_loader = data.test_loader
        self.batches_per_epoch = data.batches_per_epoch
        self.epoch, self.batch_in_epoch = cfg.begin_epoch, 0
        # The paper's iteration counter is epoch x batches per epoch, so --begin-epoch (continuing a paper
        # run) does not repeat the warm-up. Our checkpoints restore their own counters.
        self.itr = self.epoch * self.batches_per_epoch
        self.step = self.itr // cfg.update_freq
        # (test bpd, epoch, file name in SAVE/models), best first: only files this run wrote in this folder
        self.best: List[Tuple[float, int, str]] = []
        self.best_are_here = False  # resumed from a checkpoint in SAVE/models: its best files are this run's
        self.last_test_bpd: Optional[float] = None
        self.stop_signal: Optional[str] = None  # set by resflows.runlog.stop_on_signals
        self.stop_now = False  # the stop decision every rank agreed on at the last step
        self.nonfinite_in_a_row = 0
        self.writer = None  # TensorBoard, open during fit on rank 0
        self._vis_batch = None
        if ckpt is not None:
            self._restore(ckpt, ckpt_path)
        else:
            self._initialize()
        self.ddp = self._wrap()
        self.compiled = self._compile() if cfg.compile else None  # resflows.layers.compiled.CompiledPasses
        self.compile_logged = False

    @property
    def per_rank_batch(self) -> int:
        return self.cfg.batchsize // self.dist.world_size

    # -- set-up ----------------------------------------------------------------------------------
    def _wrap(self) -> nn.Module:
        """Under torchrun: DistributedDataParallel (buffers are synchronised explicitly after each step)."""
        module = ModelForward(self.model)
        if is_distributed():
            # Learned norm orders get no gradient from the loss (see norm_order_gradients): every rank computes
            # theirs from identical weights, so DDP must not wait for them.
            orders = [f"model.{n}" for n, p in self.model.named_parameters() if n.endswith(("domain", "codomain"))]
            if orders:
                # A private torch API (torch has no public way to exclude parameters from DDP): it marks the names
                # that DDP's constructor then leaves out of its gradient buckets. If torch renames or drops it,
                # --learn-p under torchrun fails at wrapping (AttributeError) or hangs waiting for these
                # gradients; tests/test_private_torch.py fails first.
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, orders)
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
        return module

    def _compile(self):
        """--compile: the per-block training passes through torch.compile (compiled at the first step)."""
        from .layers import compiled

        passes, blocks, eager = compiled.enable(self.model)
        logger.info("--compile: %d residual block(s) run compiled (primal pass, vector-Jacobian product, forward-mode "
                    "pass and its backward); graphs are built at the first step", len(blocks))
        for reason, n in eager.items():
            logger.info("--compile: %d block(s) stay eager: %s", n, reason)
        return passes

    def _log_compile(self) -> None:
        """After the first step: what compiling cost (a resume reads inductor's on-disk cache and is faster)."""
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        from .layers.compiled import compile_report

        self.compile_logged = True
        logger.info("%s (inductor's cache: %s)", compile_report(self.compiled), cache_dir())

    @torch.no_grad()
    def _initialize(self) -> None:
        """Data-dependent ActNorm initialisation on a first batch (all ranks, statistics pooled), then the
        EMA copy, so that it starts from initialised weights."""
        if is_distributed():
            for p in self.model.parameters():
                torch.distributed.broadcast(p.data, 0)
        x, _ = next(iter(self.train_loader))
        self.model.train()
        if self.model.config.classification:
            self.model.classify(x.to(self.device))  # also initialises the heads' ActNorms
        elif self.model.dequantizer is not None:
            self.model.transform(self.model.dequantize(x.to(self.device), self.nvals)[0])  # ActNorm sees x + u, u ~ q
        else:
            self.model.transform(x.to(self.device))
        broadcast_buffers(self.model)
        self.ema = EMA(self.model)

    @contextlib.contextmanager
    def _tensorboard(self) -> Iterator[None]:
        """``SAVE/tb`` open on rank 0 for the duration of ``fit``."""
        if self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.save_dir, "tb"))
        try:
            yield
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        rng = rng_state()
        if is_distributed():
            gathered: List[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = {"per_rank": gathered}
        return {
            "config": self.cfg.to_dict(),
            "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "itr": self.itr,
            "step": self.step,
            "best_test_bpd": self.best[0][0] if self.best else None,
            "best": [list(b) for b in self.best],
            "last_test_bpd": self.last_test_bpd,
            "rng": rng,
            "world_size": self.dist.world_size,
        }

    def save(self, best_score: Optional[float] = None, tag: Optional[int] = None) -> None:
        """``models/most_recent.pth`` always; ``models/checkpt-EPOCH.pth`` kept for the 5 best test bpd
        (lowest score; accuracy enters as -accuracy for the classification task)."""
        state = self.state()  # collective under torchrun: every rank takes part
        # Checked on every rank (the weights are identical), so all of them stop together; save_checkpoint
        # checks again for any other caller.
        bad = nonfinite_tensors({"model": state["model"], "ema": state["ema"], "optimizer": state["optimizer"]})
        if bad:
            raise TrainingError(
                f"the weights became non-finite at step {self.step} ({len(bad)} tensor(s), first: {bad[0]}); refusing to save "
                f"them: the checkpoints in {os.path.join(self.save_dir, 'models')} are kept. Try a lower --lr, a longer "
                f"--warmup-iters or a smaller --coeff"
            )
        if self.dist.is_main:
            models = os.path.join(self.save_dir, "models")
            save_checkpoint(os.path.join(models, "most_recent.pth"), state)
            if best_score is not None and math.isfinite(best_score):
                name = best_checkpoint_name(tag)
                cand = sorted(self.best + [(best_score, tag, name)])
                if (best_score, tag, name) in cand[:KEEP_BEST]:
                    state["best"] = [list(b) for b in cand[:KEEP_BEST]]
                    state["best_test_bpd"] = cand[0][0]
                    save_checkpoint(os.path.join(models, name), state)
                    save_checkpoint(os.path.join(models, "most_recent.pth"), state)
                    # The displaced entries: files this run wrote here, found by name (never by a stored path).
                    for _, epoch, _ in cand[KEEP_BEST:]:
                        if epoch != tag:
                            remove_own_file(models, best_checkpoint_name(epoch))
                self.best = cand[:KEEP_BEST]
        barrier()

    def save_intraepoch(self) -> None:
        """``models/most_recent_intraepoch.pth`` (``--save-freq``): the full training state, written by rank 0 only."""
        state = self.state()  # collective under torchrun
        bad = nonfinite_tensors({"model": state["model"], "ema": state["ema"], "optimizer": state["optimizer"]})
        if self.dist.is_main and not bad:
            save_checkpoint(os.path.join(self.save_dir, "models", "most_recent_intraepoch.pth"), state)
        barrier()

    def _restore(self, ckpt: Dict[str, Any], path: str) -> None:
        """Model, EMA, optimiser, counters and RNG from a checkpoint of ours or the paper's."""
        self.ema = load_weights(path, ckpt, self.model)
        saved_opt = (ckpt.get("config") or {}).get("optimizer")
        if ckpt.get("optimizer") and saved_opt == self.cfg.optimizer:
            try:
                opt_state = ckpt["optimizer"]
                if ckpt.get("format") != "resflows":
                    opt_state = paper_optimizer_state(opt_state, self.model, self.optimizer)
                self.optimizer.load_state_dict(opt_state)
                if ckpt.get("format") != "resflows":
                    logger.info("optimizer state of %s mapped onto ours (%d parameters with state)", path, len(opt_state["state"]))
            except Exception as e:  # noqa: BLE001 - any mismatch: the state is unusable, not fatal
                logger.info("optimizer state in %s not used (%s); starting the optimizer afresh", path, e)
                self.optimizer = make_optimizer(self.cfg, self.model.parameters())
            # Flags typed with --resume win over the saved hyperparameters (the LR is set every step).
            for g in self.optimizer.param_groups:
                g["weight_decay"] = self.cfg.wd
        elif ckpt.get("optimizer"):
            logger.info("--optimizer %s differs from the checkpoint's (%s): starting the optimizer afresh", self.cfg.optimizer, saved_opt)
        if ckpt.get("format") == "resflows":
            self.epoch, self.batch_in_epoch = ckpt["epoch"], ckpt.get("batch_in_epoch", 0)
            self.itr, self.step = ckpt["itr"], ckpt.get("step", ckpt["itr"])
            # Its best files are this run's only when it was read from this run's folder (not another run's, not
            # the original of a copied folder): then they are found here by name; otherwise none is ours.
            here = _same_folder(os.path.dirname(os.path.abspath(path)), os.path.join(self.save_dir, "models"))
            self.best = [(b[0], b[1], best_checkpoint_name(b[1])) for b in ckpt.get("best") or []] if here else []
            self.best_are_here = here
            self.last_test_bpd = ckpt.get("last_test_bpd")
            rng = ckpt.get("rng") or {}
            if "per_rank" in rng:
                rng = rng["per_rank"][self.dist.rank] if len(rng["per_rank"]) == self.dist.world_size else None
            elif self.dist.world_size > 1:
                rng = None  # one saved stream would make every rank draw the same probes and series lengths
            if rng is None:
                logger.info("the checkpoint's random streams do not fit %d rank(s): re-seeding per rank", self.dist.world_size)
                torch.manual_seed(rank_seed((self.cfg.seed or 0) + RESEED_STRIDE * (self.step + 1), self.dist.rank,
                                            self.dist.world_size))
            else:
                try:
                    set_rng_state(rng)
                except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
                    raise CheckpointError(f"{path}: damaged checkpoint (its random-number state cannot be restored: "
                                          f"{type(e).__name__})") from None
        else:
            if ckpt.get("epoch") is not None:  # the Monotone Flows fork stores begin_epoch / begin_iter in its checkpoints
                self.epoch = ckpt["epoch"]
                self.itr = ckpt["itr"] if ckpt.get("itr") is not None else self.epoch * self.batches_per_epoch
                self.step = self.itr // self.cfg.update_freq
            logger.info("resumed from a paper checkpoint: epoch %d (--begin-epoch), iteration %d", self.epoch, self.itr)

    def finished(self) -> Optional[str]:
        """Why a resumed run has nothing left to train (None if it has)."""
        return run_finished(self.cfg, self.epoch, self.step)

    # -- training ----------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train until --nepochs or --max-iters, or a stop signal (then saving ``most_recent.pth``)."""
        with self._tensorboard():
            self._fit()

    def _fit(self) -> None:
        cfg = self.cfg
        n_batches = self.batches_per_epoch
        if n_batches == 0:
            raise ConfigError(f"--batchsize {cfg.batchsize} leaves no full batch per rank in an epoch")
        logger.info("training: %d batches of %d per epoch per rank, %d rank(s); save folder %s",
                    n_batches, self.per_rank_batch, self.dist.world_size, self.save_dir)
        start = time.time()
        while self.epoch < cfg.nepochs:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            self.train_set.set_epoch(self.epoch)
            stopped = self.train_epoch()
            if stopped:
                self.save()
                return
            self.epoch += 1  # the checkpoint resumes at the start of the next epoch
            self.batch_in_epoch = 0
            self.end_of_epoch(self.epoch - 1)
        logger.info("finished %d epochs in %.1f min", cfg.nepochs, (time.time() - start) / 60)

    def train_epoch(self) -> bool:
        """One epoch; returns True when training must stop (max iters or a signal)."""
        cfg = self.cfg
        self.model.train()
        n_total = self.batches_per_epoch
        bar = progress(self.train_loader, self.dist.is_main, desc=f"epoch {self.epoch}", total=len(self.train_loader))
        accum: List[Dict[str, float]] = []
        for x, y in bar:
            last_of_epoch = self.batch_in_epoch + 1 == n_total
            apply = (len(accum) + 1) % cfg.update_freq == 0 or last_of_epoch
            accum.append(self.forward_backward(x.to(self.device, non_blocking=True), y.to(self.device), sync=apply,
                                               n_accum=cfg.update_freq))
            if self.compiled is not None and not self.compile_logged:
                self._log_compile()
            self.itr += 1
            self.batch_in_epoch += 1
            if not apply:
                continue
            metrics = self.optimize(len(accum))
            if metrics is not None:
                metrics.update({k: sum(a[k] for a in accum) / len(accum) for k in accum[0]})
                self.log_step(metrics)
            if cfg.save_freq and self.itr // cfg.save_freq != (self.itr - len(accum)) // cfg.save_freq:
                self.save_intraepoch()  # a multiple of --save-freq iterations was passed in this accumulation
            accum = []
            # Only after a step taken: a skipped non-finite step would draw the same grid again (from step 0's
            # weights on and on, each costing seconds) from the batch that just failed.
            if metrics is not None and self.step % cfg.vis_freq == 0 and self.dist.is_main:
                self.visualize()
            if cfg.max_iters is not None and self.step >= cfg.max_iters:
                logger.info("reached --max-iters %d", cfg.max_iters)
                return True
            if self.stop_now:
                logger.info("received %s: saving and stopping", self.stop_signal)
                return True
        return False

    def beta(self) -> float:
        a = self.cfg.annealing_iters
        return min(1.0, self.itr / a) if a > 0 else 1.0

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool, n_accum: int) -> Dict[str, float]:
        lr = self.schedule.lr(self.itr, self.epoch + self.batch_in_epoch / max(self.batches_per_epoch, 1))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        ctx = self.ddp.no_sync() if (not sync and hasattr(self.ddp, "no_sync")) else contextlib.nullcontext()
        with ctx, branch_dtype(compute_dtype(self.cfg.precision)):  # --precision bf16: the branches in bfloat16
            out = compute_loss(self.ddp, x, y, self.cfg, self.image_shape, self.nvals, self.beta())
            (out.loss / n_accum).backward()
        # The logged numbers, copied to the host together: one synchronisation per step, whatever is logged.
        parts = {"loss": out.loss}
        if out.bpd is not None:
            parts.update(bpd=out.bpd.mean(), logpz=out.logpz.mean(), neg_delta_logp=out.logdet.mean())
        if out.crossent is not None:
            parts.update(crossent=out.crossent, acc=(out.logits.argmax(1) == y).float().mean())
        if out.logq is not None:
            parts.update(logq=out.logq.mean())
        values = torch.stack([v.detach().float().reshape(()) for v in parts.values()]).tolist()
        m = dict(zip(parts, values))
        if out.logq is not None:
            # The bound's two parts in bits/dim: bpd = flow_bpd + beta * logq_bpd (flow: -log p(x + u), q: log q(u | x)).
            logq_bpd = m.pop("logq") / (math.prod(self.image_shape) * math.log(2))
            m.update(logq_bpd=logq_bpd, flow_bpd=m["bpd"] - self.beta() * logq_bpd)
        return m

    def optimize(self, n_accum: int) -> Optional[Dict[str, float]]:
        """Clip, step, Lipschitz update and EMA; a non-finite loss or gradient skips the step."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if n_accum != self.cfg.update_freq:  # a short accumulation at the end of an epoch
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(self.cfg.update_freq / n_accum)
        # --clip_grad_norm False (the Monotone Flows fork's flag): the norm is computed and logged, nothing is scaled.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM if self.cfg.clip_grad_norm else math.inf)
        # One tiny collective: every rank agrees on skipping and on stopping.
        # Built on the device (a host-built tensor would be copied over, and isfinite read back, each a sync).
        stop = torch.full((), 1.0 if self.stop_signal else 0.0, device=self.device)
        flags = torch.stack([(~torch.isfinite(grad_norm)).to(stop.dtype), stop])
        if is_distributed():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        # Decide on the agreed value only: a signal arriving after this point waits for the next step,
        # otherwise one rank could stop (and enter save's collectives) while another trains on.
        skip, self.stop_now = (flags > 0).tolist()  # the step's one read of the device
        if self.stop_now and not self.stop_signal:
            self.stop_signal = "a stop signal on another rank"
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            last = os.path.join(self.save_dir, "models", "most_recent.pth")
            where = (f"the last good checkpoint is {last}" if os.path.isfile(last) else
                     "no checkpoint was written yet (the run stopped before its first save)")
            self.nonfinite_in_a_row = skipped_nonfinite_step(
                self.nonfinite_in_a_row, self.itr,
                f"{where}. Try a lower --lr, a longer --warmup-iters or a smaller --coeff, and check the data")
            return None
        self.nonfinite_in_a_row = 0
        if self.cfg.learn_p:
            norm_order_gradients(self.model)  # after clipping and not clipped, as the paper
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.cfg.densenet and self.cfg.learnable_concat and self.epoch < self.cfg.start_learnable_concat:
            self.model.reset_concatenation()  # i-DenseNets: K is held at its initial value for the first epochs
        self.model.update_lipschitz()
        broadcast_buffers(self.model)  # bitwise identical buffers on every rank at step boundaries
        self.ema.update(self.model)
        return {"grad_norm": float(grad_norm), "lr": self.optimizer.param_groups[0]["lr"]}

    def log_step(self, m: Dict[str, float]) -> None:
        if self.step % self.cfg.print_freq and self.step != 1:
            return
        m = all_reduce_mean(m, self.device)
        if not self.dist.is_main:
            return
        parts = [f"epoch {self.epoch} | iter {self.itr} | step {self.step}"]
        if "bpd" in m:
            parts.append(f"bits/dim {m['bpd']:.4f} | log p(z) {m['logpz']:.2f} | -delta log p {m['neg_delta_logp']:.2f}")
        if "logq_bpd" in m:
            parts.append(f"flow bits/dim {m['flow_bpd']:.4f} | log q bits/dim {m['logq_bpd']:.4f}")
        if "crossent" in m:
            parts.append(f"xent {m['crossent']:.4f} | acc {m['acc']:.3f}")
        parts.append(f"grad norm {m['grad_norm']:.3f} | lr {m['lr']:.2e}")
        logger.info(" | ".join(parts))
        if self.writer:
            w, s = self.writer, self.step
            # Our bits/dim is the unbiased estimate (not the Neumann surrogate the paper logged).
            for k, tag in (("bpd", "train/bits_per_dim"), ("logpz", "train/logpz"), ("neg_delta_logp", "train/neg_delta_logp"),
                           ("grad_norm", "train/grad_norm"), ("lr", "train/lr"), ("crossent", "train/crossent"),
                           ("acc", "train/accuracy"), ("loss", "train/loss"), ("flow_bpd", "train/flow_bits_per_dim"),
                           ("logq_bpd", "train/logq_bits_per_dim")):
                if k in m:
                    w.add_scalar(tag, m[k], s)
            for name, (m1, m2) in self.model.estimator_moments().items():
                w.add_scalar(f"estimator_first_moment/{name}", m1, s)
                w.add_scalar(f"estimator_second_moment/{name}", m2, s)
            for name, its in self.model.solver_iterations().items():  # monotone blocks: evaluations of g per solve
                for kind, n in its.items():
                    w.add_scalar(f"solver_iterations/{kind}/{name}", n, s)

    def end_of_epoch(self, finished: int) -> None:
        lips = self.model.lipschitz_constants()
        if lips:
            vals = list(lips.values())
            logger.info("Lipschitz constants: min %.4f mean %.4f max %.4f (%d layers)",
                        min(vals), sum(vals) / len(vals), max(vals), len(vals))
        if self.model.config.learn_p:
            logger.info("norm orders: %s", ", ".join(f"{d:.2f}->{c:.2f}" for d, c in self.model.norm_orders().values()))
        etas = [e1 for e1, _ in self.model.concatenation_weights().values()]
        if etas:
            logger.info("dense concatenation eta1: min %.4f mean %.4f max %.4f (%d layers)",
                        min(etas), sum(etas) / len(etas), max(etas), len(etas))
        result = self.validate(label=finished)
        bpd = result.get("test_bpd")
        self.last_test_bpd = bpd
        if self.writer:
            if lips:
                self.writer.add_histogram("lipschitz_constants", torch.tensor(list(lips.values())), finished)
            if self.model.config.learn_p:
                for name, (d, c) in self.model.norm_orders().items():
                    self.writer.add_scalar(f"norm_orders/{name}.domain", d, finished)
                    self.writer.add_scalar(f"norm_orders/{name}.codomain", c, finished)
            for k, v in result.items():
                if isinstance(v, float) and k != "seconds":
                    self.writer.add_scalar(f"test/{k}", v, finished)
        score = bpd if bpd is not None else (-result["test_acc"] if "test_acc" in result else None)
        self.save(best_score=score, tag=finished)

    # -- evaluation ----------------------------------------------------------------------------------
    def eval_model(self) -> ResidualFlow:
        """EMA weights (unless --ema-val False) with power iterations re-run for them; the training
        model's u/v are left untouched (the paper leaked the EMA's into them)."""
        return prepare_for_eval(self.ema.model if self.cfg.ema_val else self.model)

    def validate(self, label: Optional[int] = None) -> Dict[str, Any]:
        """Test bits/dim (mean, standard error, count) of :meth:`eval_model` over every test image exactly once;
        accuracy for classification / hybrid (:func:`resflows.evaluation.evaluate`)."""
        with full_float32():  # whatever --precision trains with
            return evaluate(self.eval_model(), self.test_loader, self.cfg, self.device, self.dist.is_main, label)

    @torch.no_grad()
    @full_float32()
    def visualize(self) -> None:
        """Real images, samples from a fixed z, and reconstructions, as one grid (rank 0)."""
        from torchvision.utils import make_grid

        model = self.model
        was_training = model.training
        model.eval()
        if self._vis_batch is None:
            x, _ = next(iter(self.test_loader))
            g = torch.Generator().manual_seed((self.cfg.seed or 0) + VIS_SEED_OFFSET)
            self._vis_batch = (x[:VIS_IMAGES].to(self.device), torch.randn(VIS_IMAGES, model.latent_dim, generator=g).to(self.device))
        x, z_fixed = self._vis_batch
        c = self.image_shape[0]
        model.set_inverse_method(self.cfg.inverse)
        samples = model.inverse(z_fixed)[:, :c]
        recon = model.inverse(model.transform(x))[:, :c]
        grid = torch.cat([x[:, :c], samples, recon]).clamp(0, 1).cpu()
        folder = os.path.join(self.save_dir, "imgs")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"e{self.epoch:03d}_i{self.step:06d}.png")
        save_grid(grid, path, nrow=VIS_IMAGES)  # enlarged to be seen (nearest neighbour); TensorBoard gets it as is
        if self.writer:
            self.writer.add_image("real_samples_reconstructions", make_grid(grid, nrow=VIS_IMAGES), self.step)
        model.train(was_training)


def run_finished(cfg: TrainConfig, epoch: int, step: int) -> Optional[str]:
    """Why a run at ``epoch`` / ``step`` has nothing left to train under ``cfg`` (None if it has)."""
    if cfg.max_iters is not None and step >= cfg.max_iters:
        return f"already reached --max-iters {cfg.max_iters} (step {step})"
    if epoch >= cfg.nepochs:
        return f"already finished --nepochs {cfg.nepochs}"
    return None


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
