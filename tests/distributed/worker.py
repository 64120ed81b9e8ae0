"""Runs train_img.py (single process or under torchrun) with test hooks.

    python worker.py MODE OUT -- <train_img.py flags>

MODE: 'state' dumps each rank's parameters and buffers after training; 'equiv' also fixes the
Hutchinson probes per image (a hash of the input image and the block index), so that runs with
different world sizes draw the same noise; 'fail' raises on rank 1 at the second step.
"""
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import train_img  # noqa: E402
from resflows.model import ResidualFlow  # noqa: E402

_keys = []


def _image_keys(x):
    return [int(hashlib.sha1(x[i].detach().cpu().numpy().tobytes()).hexdigest()[:12], 16) for i in range(x.shape[0])]


def fix_probes_per_image(model: ResidualFlow):
    real_run = model._run

    def run_with_keys(x, *a, **k):
        _keys[:] = _image_keys(x)
        return real_run(x, *a, **k)

    model._run = run_with_keys
    for b, block in enumerate(model.iresblocks()):
        def probe(x, b=b):
            gens = [torch.Generator().manual_seed((key + 7919 * b) % (2**63)) for key in _keys]
            return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens]).to(x.device)

        block.probe_fn = probe


def main():
    mode, out = sys.argv[1], sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1:]
    rank = int(os.environ.get("RANK", 0))

    seeds = {}

    def hook(stage, trainer):
        if stage == "ready":
            seeds["rank_seed"] = torch.initial_seed()  # the seed of this rank's own streams
        if stage == "ready" and mode == "equiv":
            fix_probes_per_image(trainer.model)
        if stage == "ready" and mode == "fail" and rank == 1:
            real = trainer.optimize

            def failing(*a, **k):
                if trainer.step >= 1:
                    raise RuntimeError("injected failure on rank 1")
                return real(*a, **k)

            trainer.optimize = failing
        if stage == "done":
            torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(), "step": trainer.step, **seeds},
                       os.path.join(out, f"rank{rank}.pt"))

    # Like train_img.main, without catching errors: a failure must surface.
    code = train_img.run(argv, hook)
    train_img.cleanup_distributed()
    sys.exit(code)


if __name__ == "__main__":
    main()
