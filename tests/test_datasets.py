"""Dataset registry: splits, levels, dequantisation, determinism, clear errors for missing files."""

import numpy as np
import pytest
import torch

from resflows.datasets import DATASETS, DataNotFoundError, PthImages, build_dataset, digits_arrays, get_spec


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("RESFLOWS_OFFLINE", "1")


def test_digits_splits_and_levels():
    train = build_dataset("digits", True, add_noise=False)
    test = build_dataset("digits", False, add_noise=False)
    assert len(train) == 1500 and len(test) == 297
    images, labels = digits_arrays()
    x, y = test[0]
    assert x.shape == (1, 8, 8) and y == int(labels[1500])
    assert torch.allclose(x[0] * 16, torch.from_numpy(images[1500]).float())  # 17 levels: k / 16
    assert get_spec("digits").nvals() == 17


def test_dequantisation_over_nvals_and_determinism():
    ds = build_dataset("digits", True, seed=3)
    images, _ = digits_arrays()
    x, _ = ds[5]
    k = torch.from_numpy(images[5]).float()
    # (k + u) / 17 with u in [0, 1): floor(17 x) recovers the level.
    assert torch.equal(torch.floor(x[0] * 17), k) and x.min() >= 0 and x.max() < 1
    assert torch.equal(ds[5][0], x)  # same (seed, epoch, index) -> same noise
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], x)  # fresh noise every epoch
    other = build_dataset("digits", True, seed=4)
    assert not torch.equal(other[5][0], x)


def test_digits_upsampling_keeps_levels():
    x, _ = build_dataset("digits", False, imagesize=16, add_noise=False)[0]
    assert x.shape == (1, 16, 16) and torch.equal(x[0, ::2, ::2], x[0, 1::2, 1::2])
    with pytest.raises(ValueError, match="multiple of 8"):
        build_dataset("digits", False, imagesize=12)


def test_padding_channels():
    x, _ = build_dataset("digits", False, padding=2)[0]
    assert x.shape == (3, 8, 8) and (x[1:] >= 0).all() and (x[1:] < 1.0 / 17 + 1e-6).all()


def _write_pth(path, shape, high=256):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = torch.randint(0, high, shape, dtype=torch.uint8)
    torch.save(data, path)
    return data


def test_pth_datasets_under_dataroot(tmp_path):
    _write_pth(tmp_path / "imagenet32" / "train_32x32.pth", (6, 3, 32, 32))
    valid = _write_pth(tmp_path / "imagenet32" / "valid_32x32.pth", (4, 3, 32, 32))
    ds = build_dataset("imagenet32", False, dataroot=str(tmp_path), add_noise=False)
    assert len(ds) == 4 and torch.allclose(ds[2][0] * 255, valid[2].float())
    assert len(build_dataset("imagenet32", True, dataroot=str(tmp_path))) == 6


def test_celebahq_bit_reduction_and_celeba5bit_split(tmp_path):
    data = _write_pth(tmp_path / "celebahq" / "celeba256_validation.pth", (2, 3, 256, 256))
    ds = build_dataset("celebahq", False, dataroot=str(tmp_path), nbits=5, add_noise=False)
    assert torch.allclose(ds[1][0] * 31, torch.div(data[1], 8, rounding_mode="floor").float())
    _write_pth(tmp_path / "celebahq64_5bit" / "celeba_full_64x64_5bit.pth", (7, 3, 64, 64), high=32)
    assert len(build_dataset("celeba_5bit", False, dataroot=str(tmp_path))) == 7  # first 5000 (here: all 7)
    assert get_spec("celeba_5bit").nvals() == 32


def test_missing_pth_names_the_preprocessing_script(tmp_path):
    with pytest.raises(DataNotFoundError, match="extract_celeba_from_tfrecords.py"):
        build_dataset("celebahq", True, dataroot=str(tmp_path))
    bad = tmp_path / "imagenet64" / "valid_64x64.pth"
    bad.parent.mkdir()
    torch.save(torch.zeros(2, 3, 64, 64), bad)  # float, not uint8
    with pytest.raises(DataNotFoundError, match="must hold a uint8 tensor"):
        PthImages(str(bad))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"), ("svhn", "train_32x32.mat")])
def test_offline_torchvision_datasets_say_where_files_go(tmp_path, name, folder):
    with pytest.raises(DataNotFoundError, match=folder.split("/")[0]) as info:
        build_dataset(name, True, dataroot=str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_mnist_gz_files_are_extracted(tmp_path):
    import gzip
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.randint(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    for name, arr, magic in (("train-images-idx3-ubyte", imgs, 2051), ("t10k-images-idx3-ubyte", imgs, 2051),
                             ("train-labels-idx1-ubyte", labels, 2049), ("t10k-labels-idx1-ubyte", labels, 2049)):
        with gzip.open(raw / (name + ".gz"), "wb") as f:
            f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes())
    ds = build_dataset("mnist", False, dataroot=str(tmp_path), imagesize=28, add_noise=False)
    assert len(ds) == 3 and torch.allclose(ds[1][0][0] * 255, torch.from_numpy(imgs[1]).float())


def test_every_registered_dataset_has_traits():
    for name, spec in DATASETS.items():
        assert spec.im_dim in (1, 3) and spec.nvals(8) >= 2 and spec.native_size >= 8
    with pytest.raises(ValueError, match="unknown --data"):
        get_spec("imagenet1k")
