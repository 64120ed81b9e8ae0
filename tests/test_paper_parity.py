"""Same numbers as the paper's code: one test (or a few) per behaviour of the paper's that we once did
otherwise (docs/paper-differences.md lists what we keep and where we differ on purpose).

Each test states the paper's behaviour it checks; all fail on the code before the change.
"""
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import train_img
from resflows import ModelConfig, ResidualFlow, TrainConfig, read_checkpoint
from resflows.cli import parse_args
from resflows.datasets import ImageLevelsDataset, PthImages, build_dataset
from resflows.distributed import DistInfo
from resflows.factory import model_config_from
from resflows.layers.lipschitz import InducedNormConv2d, InducedNormLinear
from resflows.loaders import tensor_data
from resflows.optim import LRSchedule
from resflows.trainer import Trainer
from tests.test_train_img import TINY, run_ok

D64 = torch.float64


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("RESFLOWS_OFFLINE", "1")


class _Levels(torch.utils.data.Dataset):
    def __init__(self, k):
        self.k = k

    def __len__(self):
        return self.k.shape[0]

    def __getitem__(self, i):
        return self.k[i].clone(), 0


# -- 1. 5-bit dequantisation -----------------------------------------------------------------------------
def test_paper_dequantisation_of_reduced_bits():
    k8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(4, 3, 1, 1)
    k = (k8 // 8).double()  # the 5-bit level
    src = _Levels(k8)
    exact = ImageLevelsDataset(src, 32, levels_from=256)
    paper = ImageLevelsDataset(src, 32, levels_from=256, dequant="paper")
    for i in range(4):
        u_exact = exact[i][0].double() * 32 - k[i]
        u_paper = paper[i][0].double() * 32 - 31 * k[i] / 32  # the paper's (31k/32 + u) / 32
        assert 0 <= u_exact.min() and u_exact.max() < 1 + 1e-5
        assert 0 <= u_paper.min() and u_paper.max() < 1 + 1e-5
        assert torch.allclose(u_exact, u_paper, atol=1e-5)  # the same noise, only the bins move
    assert float(paper[0][0].max()) < 31 / 32 * 31 / 32 + 1 / 32 + 1e-6  # data in [0, 0.968]
    # Without noise: the paper's k / 32 against our k / 31.
    assert torch.allclose(ImageLevelsDataset(src, 32, add_noise=False, levels_from=256, dequant="paper")[1][0].double(),
                          k[1] / 32, atol=1e-6)
    assert torch.allclose(ImageLevelsDataset(src, 32, add_noise=False, levels_from=256)[1][0].double(), k[1] / 31, atol=1e-6)
    # 8-bit data: the two modes are the same map.
    full = ImageLevelsDataset(src, 256, dequant="paper")
    assert torch.equal(full[2][0], ImageLevelsDataset(src, 256)[2][0])


def test_dequant_flag_start_line_and_eval_json(tmp_path, capsys, monkeypatch):
    assert parse_args([])[0].dequant == "exact" and parse_args(["--dequant", "paper"])[0].dequant == "paper"

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(train_img, "ResidualFlow", stop)  # the line comes before the model is built
    root = tmp_path / "data"
    (root / "celebahq").mkdir(parents=True)
    for split in ("train", "validation"):  # the data is read before the line is logged: two tiny 5-bit files
        torch.save(torch.randint(0, 32, (2, 3, 256, 256), dtype=torch.uint8), root / "celebahq" / f"celeba256_{split}.pth")
    for extra, expected in (([], True), (["--dequant", "paper"], False)):
        with pytest.raises(Stop):
            # (a small model: the default one at 256x256 and batch 64 is refused for its memory)
            train_img.run(["--data", "celebahq", "--nbits", "5", "--nblocks", "2", "--idim", "8", "--batchsize", "2",
                           "--val-batchsize", "2", "--dataroot", str(root), "--nworkers", "0", "--save", str(tmp_path / "c"),
                           "--seed", "0"] + extra)
        out = capsys.readouterr().out
        assert ("dequantisation: exact" in out) == expected
    monkeypatch.undo()
    monkeypatch.setenv("RESFLOWS_OFFLINE", "1")
    run_ok(TINY + ["--max-iters", "1", "--save", tmp_path / "run"], capsys)
    ckpt = tmp_path / "run" / "models" / "most_recent.pth"
    run_ok(["--resume", ckpt, "--evaluate", "--dequant", "paper", "--nworkers", "0"], capsys)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["dequant"] == "paper"


# -- 2. last classification head with --factor-out --------------------------------------------------------
def test_last_head_sees_the_previous_factored_out_half():
    torch.manual_seed(0)
    model = ResidualFlow(ModelConfig(input_size=(1, 16, 16), nblocks=(1, 1, 1), idim=4, factor_out=True, fc_end=False,
                                     classification=True, cdim=8)).eval()
    seen = []
    model.classification_heads[-1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    z, _, _ = model.forward_with_logits(torch.rand(2, 1, 16, 16))
    d0, d1, d2 = (math.prod(d) for d in model.dims)
    assert model.dims[1] == model.dims[2]
    f1 = z[:, d0:d0 + d1].reshape(2, *model.dims[1])
    assert torch.equal(seen[0], f1)


# -- 4. SVHN random crop for every task --------------------------------------------------------------------
def test_svhn_training_images_are_randomly_cropped_for_density(monkeypatch):
    from PIL import Image

    import resflows.datasets as datasets

    img = (torch.arange(32 * 32 * 3) % 251).to(torch.uint8).view(32, 32, 3).numpy()

    class Fake:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return Image.fromarray(img), 1

    monkeypatch.setattr(datasets, "_torchvision", lambda name, root, train: Fake())
    ds = build_dataset("svhn", train=True, task="density", add_noise=False)
    plain = torch.from_numpy(img).permute(2, 0, 1).double() / 255
    shifted = sum(not torch.allclose(ds[i][0].double(), plain, atol=1e-6) for i in range(8))
    assert shifted >= 4  # a 4-pixel random crop leaves an image in place with probability 1/81
    test = build_dataset("svhn", train=False, task="density", add_noise=False)
    assert torch.allclose(test[0][0].double(), plain, atol=1e-6)


# -- 5. --learn-p ----------------------------------------------------------------------------------------
def _learnp_model():
    torch.manual_seed(0)
    return ResidualFlow(ModelConfig(input_size=(1, 8, 8), nblocks=(1,), idim=4, fc_idim=8, fc_nblocks=1,
                                    learn_p=True, kernels=(3, 1), vnorms=(2, 2, 2))).double()


def _orders(model):
    return [p for n, p in model.named_parameters() if n.endswith(("domain", "codomain"))]


def test_learned_orders_do_not_enter_the_forward_pass():
    model = _learnp_model().eval()
    x = torch.rand(3, 1, 8, 8, dtype=D64)
    z0 = model.transform(x)
    with torch.no_grad():
        for p in _orders(model):
            p.add_(0.7)
    assert torch.equal(model.transform(x), z0)  # the stored u, v: z does not depend on the orders
    model.train()
    z, logdet = model(x)
    (z.pow(2).sum() - logdet.sum()).backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in _orders(model))


def _squash(x):
    # The paper's map of a raw order to (1, 5): tanh(-leaky_elu(-x + c)) * 2 + 3, c its literal for atanh(1/2).
    t = -x + 0.5493061829986572
    return torch.tanh(-(0.3 * t + 0.7 * F.elu(t))) * 2 + 3


def _dense(layer):
    # The layer's weight as an explicit matrix over flattened inputs.
    w = layer.weight.detach()
    if isinstance(layer, InducedNormLinear) or layer.is_1x1:
        return w.reshape(w.shape[0], -1)
    c, (h, wd) = layer.in_channels, layer.in_hw
    basis = torch.eye(c * h * wd, dtype=w.dtype).view(-1, c, h, wd)
    return F.conv2d(basis, w, None, layer.stride, layer.padding).reshape(c * h * wd, -1).t()


def test_order_gradients_are_the_papers_one_step_objective():
    from resflows.layers.lipschitz import norm_order_gradients

    model = _learnp_model()
    layers = [m for m in model.modules() if isinstance(m, (InducedNormConv2d, InducedNormLinear))]
    raw = {id(p): p.detach().clone().requires_grad_(True) for p in _orders(model)}
    with torch.no_grad():
        for i, p in enumerate(_orders(model)):
            p.fill_(0.3 * (i - 1))  # orders away from 2
            raw[id(p)] = p.detach().clone().requires_grad_(True)
    total = 0
    for m in layers:
        A = _dense(m)
        p, q = _squash(raw[id(m.domain)]), _squash(raw[id(m.codomain)])
        w = A @ m.v.detach()
        u = torch.sign(w) * w.abs() ** (q - 1)
        u = u / (u.abs() ** (q / (q - 1))).sum() ** ((q - 1) / q)
        t = A.t() @ u
        v = torch.sign(t) * t.abs() ** (1 / (p - 1))
        v = v / (v.abs() ** p).sum() ** (1 / p)
        total = total + u @ (A @ v)
    (total / len(layers)).backward()
    objective = norm_order_gradients(model)
    assert float(objective) == pytest.approx(float(total.detach() / len(layers)), rel=1e-10)
    for p in _orders(model):
        assert torch.allclose(p.grad, raw[id(p)].grad, rtol=1e-7, atol=1e-12), (p.grad, raw[id(p)].grad)
    assert all(m.weight.grad is None for m in layers)  # weights get nothing from this objective


def test_order_gradients_come_after_clipping_and_are_not_clipped(tmp_path):
    from resflows.layers.lipschitz import norm_order_gradients

    model = _learnp_model().float()
    cfg = TrainConfig(learn_p=True, lr=0.0)
    x = torch.rand(2, *model.config.input_size)
    trainer = Trainer(cfg, DistInfo(), model, str(tmp_path), data=tensor_data(x, torch.zeros(2, dtype=torch.long), 2))
    expected = {}
    with torch.no_grad():
        for p in _orders(model):
            p.fill_(0.5)
    norm_order_gradients(model)
    for p in _orders(model):
        expected[id(p)] = p.grad.clone()
        p.grad = None
    for p in model.parameters():  # a large loss gradient: clipping scales it down to norm 1
        if p.requires_grad and not any(p is o for o in _orders(model)):
            p.grad = torch.full_like(p, 100.0)
    seen = {}

    def step():
        seen.update({id(p): p.grad.clone() for p in model.parameters() if p.grad is not None})

    trainer.optimizer.step = step
    trainer.optimize(1)
    weights = [g for k, g in seen.items() if k not in expected]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in weights])) == pytest.approx(1.0, rel=1e-4)
    for p in _orders(model):
        assert torch.equal(seen[id(p)], expected[id(p)])


# -- 6. continuing a paper run -----------------------------------------------------------------------------
def test_a_paper_checkpoints_optimizer_state_is_mapped(reference_dir, tmp_path):
    from resflows.legacy import load_paper_checkpoint

    path = reference_dir / "legacy" / "checkpoint.pth"
    ckpt = read_checkpoint(str(path))
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = ResidualFlow(ModelConfig.from_dict(ckpt["model_config"]))
    x = torch.rand(2, *model.config.input_size)
    trainer = Trainer(cfg, DistInfo(), model, str(tmp_path), ckpt=ckpt, ckpt_path=str(path),
                      data=tensor_data(x, torch.zeros(2, dtype=torch.long), 2))
    paper = load_paper_checkpoint(str(path))["optimizer_state_dict"]
    params = list(model.parameters())
    assert len(params) == 92 and len(trainer.optimizer.state) == 78
    for i, p in enumerate(params):
        if not p.requires_grad:
            assert i not in paper["state"]  # the frozen geom_p / lamb
            continue
        st = trainer.optimizer.state[p]
        assert torch.equal(st["exp_avg"], paper["state"][i]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], paper["state"][i]["exp_avg_sq"])
        assert float(st["step"]) == 40
    trainer.optimizer.step()  # the mapped state is usable


def test_begin_epoch_starts_the_iteration_counter(tmp_path):
    cfg = TrainConfig(data="digits", nblocks="1", idim=4, fc_idim=8, batchsize=100, nworkers=0, begin_epoch=3, seed=0,
                      warmup_iters=40)
    model = ResidualFlow(model_config_from(cfg))
    trainer = Trainer(cfg, DistInfo(), model, str(tmp_path))
    assert trainer.batches_per_epoch == 15 and trainer.itr == 45
    assert trainer.schedule.lr(trainer.itr, 3.0) == cfg.lr  # the warm-up is not repeated


# -- 7. --imagesize --------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,size", [("mnist", 32), ("cifar10", 32), ("svhn", 32), ("digits", 8)])
def test_imagesize_defaults_to_32_for_paper_datasets(data, size):
    nblocks = ["--nblocks", "2-2"]  # (the default 16-16-16 needs more halvings than 8x8 digits allow)
    cfg, _ = parse_args(["--data", data] + nblocks)
    assert model_config_from(cfg).input_size[1:] == (size, size)
    cfg, _ = parse_args(["--data", data, "--imagesize", "16"] + nblocks)
    assert model_config_from(cfg).input_size[1:] == (16, 16)


# -- 8. --scheduler ----------------------------------------------------------------------------------------
def test_scheduler_is_cosine_for_adam_only():
    for opt in ("adamax", "rmsprop"):
        s = LRSchedule(TrainConfig(lr=1.0, warmup_iters=0, scheduler=True, optimizer=opt))
        assert [s.lr(1000, e) for e in (0.0, 10.0, 30.0)] == [1.0, 1.0, 1.0]
    assert LRSchedule(TrainConfig(lr=1.0, warmup_iters=0, scheduler=True, optimizer="adam")).lr(1000, 10.0) == pytest.approx(0.5)


# -- 10. full float32 on GPUs ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,expected", [([], False), (["--tf32", "True"], True)])
def test_tf32_is_off_unless_asked(tmp_path, extra, expected):
    class Ready(Exception):
        pass

    seen = {}

    def hook(stage, trainer):
        seen["flags"] = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        raise Ready

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not expected
    try:
        with pytest.raises(Ready):
            train_img.run(TINY + ["--save", str(tmp_path / "run")] + extra, hook=hook)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert seen["flags"] == (expected, expected)


# -- 11. small ones ----------------------------------------------------------------------------------------
def test_n_samples_may_change_on_resume(tmp_path, capsys):
    run_ok(TINY + ["--max-iters", "1", "--save", tmp_path / "run"], capsys)
    ckpt = tmp_path / "run" / "models" / "most_recent.pth"
    run_ok(["--resume", ckpt, "--max-iters", "2", "--n-samples", "3", "--nworkers", "0"], capsys)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 2 and saved["config"]["n_samples"] == 3
    assert all(v.shape == (3,) for k, v in saved["model"].items() if k.endswith("last_n_samples"))


def test_old_format_pth_datasets_load_without_memory_mapping(tmp_path):
    import resflows.datasets as datasets

    data = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    path = tmp_path / "old.pth"
    torch.save(data, path, _use_new_zipfile_serialization=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("resflows")
    log.addHandler(handler)
    if hasattr(datasets, "_note_not_memory_mapped"):
        datasets._note_not_memory_mapped.cache_clear()  # "once" per process: start afresh
    try:
        first, second = PthImages(str(path)), PthImages(str(path), start=0, stop=2)
    finally:
        log.removeHandler(handler)
    assert torch.equal(first.data, data) and len(second) == 2
    assert len(records) == 1 and "memory-mapped" in records[0].getMessage()


@pytest.mark.slow
def test_learned_orders_under_torchrun(tmp_path):
    """The orders get no gradient from the loss, so DDP must not wait for them; both ranks compute the same."""
    from tests.distributed.test_ddp import TINY as DDP_TINY
    from tests.distributed.test_ddp import WORKER, torchrun

    proc = torchrun([WORKER, "state", tmp_path, "--"] + DDP_TINY + ["--batchsize", "40", "--max-iters", "3",
                    "--learn-p", "True", "--save", tmp_path / "run"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    orders = [k for k in r0["model"] if k.endswith("domain")]
    assert orders and r0["step"] == r1["step"] == 3
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert any(float(r0["model"][k]) != 0.0 for k in orders)  # the orders moved
