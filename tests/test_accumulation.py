"""--update-freq 2 at batch B makes the same optimiser step as batch 2B (same examples, probes fixed per
example, fixed truncation): the accumulated gradient is the mean over the 2B examples."""
import pytest
import torch

import train_img
from resflows.layers import iResBlock

ARGS = ["--data", "digits", "--nblocks", "1", "--idim", "8", "--fc-idim", "16", "--nworkers", "0",
        "--actnorm", "False", "--n-power-series", "3", "--warmup-iters", "0", "--optimizer", "sgd", "--lr", "0.05",
        "--max-iters", "1", "--print-freq", "1", "--vis-freq", "1000", "--seed", "1"]


pytestmark = pytest.mark.usefixtures("offline")


def _train(tmp_path, monkeypatch, name, batch, update_freq):
    grads = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **kw):
        params = list(params)
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())  # before clipping
        return real_clip(params, max_norm, *a, **kw)

    real_init = iResBlock.__init__

    def init_with_fixed_probes(self, *a, **kw):
        real_init(self, *a, **kw)
        self.probe_fn = lambda x: torch.cos(37.0 * x + 1.0)  # a probe that depends on the example only

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(iResBlock, "__init__", init_with_fixed_probes)
    save = tmp_path / name
    argv = ARGS + ["--batchsize", str(batch), "--update-freq", str(update_freq), "--save", str(save)]
    assert train_img.main(argv) == 0
    ckpt = torch.load(save / "models" / "most_recent.pth", weights_only=True)
    assert ckpt["step"] == 1 and len(grads) == 1
    return grads[0], ckpt["model"]


def test_update_freq_2_equals_the_double_batch(tmp_path, monkeypatch, capsys):
    g_big, model_big = _train(tmp_path, monkeypatch, "big", batch=16, update_freq=1)
    g_acc, model_acc = _train(tmp_path, monkeypatch, "acc", batch=8, update_freq=2)
    capsys.readouterr()
    assert g_big.abs().max() > 0
    torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6 * float(g_big.abs().max()))
    for key, value in model_big.items():
        if key.rsplit(".", 1)[-1] in ("last_firmom", "last_secmom", "last_n_samples"):
            continue  # statistics of the last forward: of 8 examples in one run, 16 in the other
        torch.testing.assert_close(model_acc[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
