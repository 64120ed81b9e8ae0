"""resflows/layers/jacobian.py: the brute-force Jacobian helpers every estimator is checked against."""
import subprocess
import sys


def test_logabsdet_survives_a_change_of_thread_count():
    """torch 2.14's batched CPU LU (MKL) fails and never returns on 256 x 256 matrices once the thread count
    has changed; logabsdet, which the exact log-dets use, must still give slogdet's values."""
    code = (
        "import torch\n"
        "from resflows.layers.jacobian import logabsdet\n"
        "n = torch.get_num_threads(); torch.set_num_threads(1); torch.set_num_threads(max(n, 2))\n"
        "m = torch.randn(3, 256, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
        "ref = [float(torch.linalg.slogdet(a)[1]) for a in m]\n"
        "got = logabsdet(m).tolist()\n"
        "assert all(abs(a - b) < 1e-9 * abs(b) for a, b in zip(got, ref)), (got, ref)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_jacobian_helpers_agree_with_autograd():
    import torch

    from resflows.layers.jacobian import batch_jacobian, jacobian_logdet, per_example_jacobian

    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 3, dtype=torch.float64, generator=g) * 0.3
    fn = lambda t: t + torch.tanh(t @ w.T)  # noqa: E731
    x = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    ref = torch.stack([torch.autograd.functional.jacobian(fn, xi) for xi in x.detach()])
    assert torch.allclose(batch_jacobian(fn(x), x), ref, rtol=1e-12, atol=0)
    assert torch.allclose(per_example_jacobian(fn, x), ref, rtol=1e-12, atol=0)
    out, logdet = jacobian_logdet(fn, x)
    assert torch.allclose(out, fn(x).detach()) and torch.allclose(logdet, torch.linalg.slogdet(ref)[1], rtol=1e-12, atol=0)
