"""Dataset registry: every ``--data`` choice, its traits, and loaders that fail with clear messages.

Every dataset yields pixel *levels* (integers ``0 .. nvals-1``) that are augmented and dequantised here:
``x = (k + u) / nvals`` with ``u ~ U[0, 1)`` (``--add-noise``), else ``k / (nvals - 1)``. All randomness of
an item (flip, crop, dequantisation noise, padding channels) comes from a generator seeded by
``(seed, epoch, index)``, so a run is reproducible whatever the number of DataLoader workers or ranks,
and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import math
import os
import shutil
import socket
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "TorchvisionFiles",
    "PthFiles",
    "DataNotFoundError",
    "ImageLevelsDataset",
    "PthImages",
    "DigitsImages",
    "get_spec",
    "build_dataset",
    "digits_arrays",
    "check_mnist_raw",
    "check_levels",
]

Tensor = torch.Tensor


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where to put them or how to build them."""


# ------------------------------------------------------------------------------------------------
# Sources of uint8 level images
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _note_not_memory_mapped(path: str) -> None:
    # Once per file (celeba_5bit reads one file for both splits).
    logging.getLogger("resflows").warning(
        "%s is in torch's old non-zip format: loaded into memory instead of memory-mapped "
        "(re-save it with torch.save to memory-map it)", path)


class PthImages(Dataset):
    """A ``.pth`` file holding a uint8 ``[N, C, H, W]`` tensor (the paper's format); labels are 0.

    The file is memory-mapped, so ImageNet-sized arrays are read image by image instead of loaded
    whole. ``start``/``stop`` select a slice (celeba_5bit's reference test split is the first 5000).
    """

    def __init__(self, path: str, script_hint: str = "", start: int = 0, stop: Optional[int] = None):
        if not os.path.isfile(path):
            hint = f" Build it with {script_hint}." if script_hint else ""
            raise DataNotFoundError(f"dataset file {path} not found.{hint} See README.md, section Preprocessing.")
        try:
            if zipfile.is_zipfile(path):
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            else:
                # torch's old (pre-1.6, non-zip) format cannot be memory-mapped: read it whole.
                data = torch.load(path, map_location="cpu", weights_only=True)
                _note_not_memory_mapped(os.path.abspath(path))
        except Exception as e:  # noqa: BLE001 - any failure here means a bad file
            raise DataNotFoundError(f"{path} is not a readable .pth tensor file ({type(e).__name__}: {e}).") from None
        if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.dtype != torch.uint8:
            desc = f"{data.dtype} tensor of shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
            raise DataNotFoundError(f"{path} must hold a uint8 tensor [N, C, H, W]; it holds a {desc}.")
        self.data = data[start:stop]
        self.path = path

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return self.data[i].clone(), 0


def check_levels(data: Tensor, nvals: int, path: str, script: str = "") -> None:
    """Every value of ``data`` is a level below ``nvals`` (read in chunks: the file may be memory-mapped).
    Levels out of range (an 8-bit file where 5-bit data is expected) would make every loss non-finite."""
    step = max(1, (1 << 26) // max(1, data[0].numel())) if len(data) else 1
    for i in range(0, len(data), step):
        top = int(data[i: i + step].max())
        if top >= nvals:
            hint = f"; rebuild it with {script}" if script else ""
            raise DataNotFoundError(f"{path} holds pixel levels up to {top} (found in images {i} to "
                                    f"{min(i + step, len(data)) - 1}), but this dataset has {nvals} levels, "
                                    f"0 to {nvals - 1}{hint} (with --max-value {nvals - 1})")


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 levels 0..16 ([1797, 8, 8]) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the install
        raise DataNotFoundError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


class DigitsImages(Dataset):
    """scikit-learn's 8x8 digits (17 grey levels): the first 1500 train, the last 297 test.
    ``imagesize`` > 8 upsamples by nearest neighbour (integer factor), keeping the 17 levels."""

    N_TRAIN = 1500

    def __init__(self, train: bool, imagesize: int = 8):
        if imagesize % 8:
            raise ValueError(f"--imagesize for digits must be a multiple of 8 (native 8x8), got {imagesize}")
        images, labels = digits_arrays()
        sl = slice(0, self.N_TRAIN) if train else slice(self.N_TRAIN, None)
        x = torch.from_numpy(images[sl]).unsqueeze(1)
        if imagesize != 8:
            x = x.repeat_interleave(imagesize // 8, 2).repeat_interleave(imagesize // 8, 3)
        self.data, self.labels = x.contiguous(), torch.from_numpy(labels[sl])

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return self.data[i].clone(), int(self.labels[i])


class _TorchvisionImages(Dataset):
    """A torchvision dataset resized with PIL and returned as uint8 levels."""

    def __init__(self, ds, imagesize: int):
        from torchvision import transforms

        self.ds = ds
        self.tf = transforms.Compose([transforms.Resize(imagesize), transforms.CenterCrop(imagesize), transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        img, y = self.ds[i]
        return self.tf(img), int(y)


# (the URL of DATASETS["mnist"], which is defined below)
_MNIST_WHAT = "download it again from https://ossci-datasets.s3.amazonaws.com/mnist/"


def _gunzip_mnist(root: str) -> None:
    # Users often drop the .gz files in place; torchvision only looks for the extracted ones.
    raw = os.path.join(root, "MNIST", "raw")
    for name in DATASETS["mnist"].files.files:
        target, gz = os.path.join(raw, name), os.path.join(raw, name + ".gz")
        if not os.path.exists(target) and os.path.exists(gz):
            try:
                with gzip.open(gz, "rb") as src, open(target + ".part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut file ends in EOFError
                with contextlib.suppress(OSError):
                    os.remove(target + ".part")
                if isinstance(e, OSError) and e.errno is not None:
                    raise  # a full disk or a permission: describe_error names the file and the reason
                raise DataNotFoundError(f"{gz} is not a complete gzip file ({type(e).__name__}); delete it and "
                                        f"{_MNIST_WHAT}") from None
            os.replace(target + ".part", target)


def check_mnist_raw(root: str) -> None:
    """Check the headers of the extracted MNIST idx files under ``root/MNIST/raw`` (magic number, sizes that
    match the file's length, 28x28 images), so that a damaged file is named in one line instead of failing
    inside torchvision."""
    raw = os.path.join(root, "MNIST", "raw")
    for name in DATASETS["mnist"].files.files:
        path = os.path.join(raw, name)
        if not os.path.isfile(path):
            continue  # missing files: torchvision's check, then the message of _torchvision
        images = "images" in name
        ndim = 3 if images else 1
        with open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
        size = os.path.getsize(path)
        problem = None
        if len(header) < 4 + 4 * ndim:
            problem = f"it is only {size} bytes long"
        else:
            magic, *dims = struct.unpack(f">{1 + ndim}I", header)
            if magic != (2051 if images else 2049):
                problem = f"it does not start with the idx magic number of MNIST {'images' if images else 'labels'}"
            elif images and tuple(dims[1:]) != (28, 28):
                problem = f"it holds {dims[1]}x{dims[2]} images, not 28x28"
            elif size != len(header) + math.prod(dims):
                problem = f"its header announces {dims[0]} items but the file has {size} bytes (truncated?)"
        if problem:
            raise DataNotFoundError(f"{path} is not a valid MNIST idx file ({problem}); delete it and {_MNIST_WHAT}")


def _torchvision(name: str, root: str, train: bool):
    from torchvision import datasets as tvd

    tv = get_spec(name).files
    if tv.gunzip:
        _gunzip_mnist(root)
        check_mnist_raw(root)

    def make(download: bool):
        split = dict(split="train" if train else "test") if tv.split_arg else dict(train=train)
        return getattr(tvd, tv.cls)(root, download=download, **split)

    try:
        return make(False)
    except (RuntimeError, OSError):
        pass
    sub, files, url = tv.folder, tv.files, tv.url
    folder = os.path.normpath(os.path.join(root, sub))
    where = f"Place {', '.join(files)} in {folder} (from {url}), or run once with internet access."
    if os.environ.get("RESFLOWS_OFFLINE"):
        raise DataNotFoundError(f"{name} is not under {folder} (RESFLOWS_OFFLINE is set, so no download). {where}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a blocked network fails instead of hanging
    try:
        return make(True)
    except Exception as e:  # noqa: BLE001 - offline, proxy, disk: all mean "files missing"
        raise DataNotFoundError(f"{name} is not under {folder} and could not be downloaded ({type(e).__name__}). {where}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


# ------------------------------------------------------------------------------------------------
# Augmentation, dequantisation, padding
# ------------------------------------------------------------------------------------------------
def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), stable across processes."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _flip(k: Tensor, g: torch.Generator) -> Tensor:
    return k.flip(-1) if torch.rand((), generator=g) < 0.5 else k


def _random_crop(pad: int, mode: str) -> Callable[[Tensor, torch.Generator], Tensor]:
    from torchvision.transforms import functional as TF

    def crop(k: Tensor, g: torch.Generator) -> Tensor:
        h, w = k.shape[-2:]
        padded = TF.pad(k, [pad, pad, pad, pad], padding_mode=mode)
        i = int(torch.randint(0, 2 * pad + 1, (), generator=g))
        j = int(torch.randint(0, 2 * pad + 1, (), generator=g))
        return padded[..., i : i + h, j : j + w]

    return crop


class ImageLevelsDataset(Dataset):
    """Augments and dequantises a source of level images; deterministic per (seed, epoch, index)."""

    def __init__(self, source: Dataset, nvals: int, augment: Tuple[Callable, ...] = (), add_noise: bool = True,
                 padding: int = 0, padding_dist: str = "uniform", seed: int = 0, levels_from: int = 256,
                 dequant: str = "exact"):
        self.source, self.nvals, self.augment = source, nvals, tuple(augment)
        if dequant not in ("exact", "paper"):
            raise ValueError(f"--dequant must be exact or paper, got {dequant!r}")
        self.dequant = dequant
        self.add_noise, self.padding, self.padding_dist = add_noise, padding, padding_dist
        self.seed, self.epoch = seed, 0
        # Bit reduction (celebahq --nbits): source levels 0..levels_from-1 -> 0..nvals-1.
        self.shift = int(round(math.log2(levels_from // nvals))) if levels_from > nvals else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, i))
        k, y = self.source[i]
        for aug in self.augment:
            k = aug(k, g)
        if self.shift:
            k = torch.div(k, 2**self.shift, rounding_mode="floor")
        x = k.to(torch.float32)
        if self.shift and self.dequant == "paper":
            # The paper's reduce_bits gives k / nvals and its add_noise then scales by nvals - 1:
            # x = ((nvals - 1) k / nvals + u) / nvals, overlapping bins in [0, 1 - 1/nvals] (or k / nvals).
            x = x / self.nvals
            if self.add_noise:
                x = (x * (self.nvals - 1) + torch.rand(x.shape, generator=g)) / self.nvals
        elif self.add_noise:
            x = (x + torch.rand(x.shape, generator=g)) / self.nvals
        else:
            x = x / (self.nvals - 1)
        if self.padding:
            shape = (self.padding, *x.shape[1:])
            if self.padding_dist == "uniform":
                u = torch.rand(shape, generator=g)
            else:
                u = torch.randn(shape, generator=g) * (self.nvals / 8) + self.nvals / 2
            x = torch.cat([x, u / self.nvals], 0)
        return x, y


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchvisionFiles:
    """A torchvision dataset: its class, where its files go under ``--dataroot`` and where to get them."""

    cls: str  # the torchvision.datasets class
    folder: str
    files: Tuple[str, ...]
    url: str
    split_arg: bool = False  # the class takes split="train" / "test" (SVHN), not train=True / False
    gunzip: bool = False  # .gz files dropped in place are extracted first (MNIST)


@dataclass(frozen=True)
class PthFiles:
    """A dataset in ``.pth`` files (uint8 ``[N, C, H, W]``), relative to ``--dataroot``, and the script that
    builds them."""

    train: str
    test: str
    script: str
    test_stop: Optional[int] = None  # the test split is the first test_stop images of ``test``


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--data`` choice: what the model and the loss need to know, where its images come from, and
    its training augmentation."""

    name: str
    im_dim: int
    n_classes: int
    native_size: int
    forced_size: bool  # the paper forces this image size whatever --imagesize says
    logit_alpha: float
    nvals_fixed: Optional[int] = None  # None: 2**nbits (celebahq)
    default_size: int = 32  # without --imagesize (the paper's default 32; digits: native 8)
    files: Union[None, TorchvisionFiles, PthFiles] = None  # None: scikit-learn's digits
    file_levels: Optional[int] = None  # levels in the files when --nbits reduces them (celebahq: 256)
    crop: Optional[str] = None  # training random crop (pad 4): "always", or "classification" (that task and hybrid)
    flip: bool = False  # training horizontal flips (after the crop)

    def nvals(self, nbits: int = 8) -> int:
        return self.nvals_fixed if self.nvals_fixed is not None else 2**nbits

    def resolve_size(self, imagesize: Optional[int]) -> int:
        if self.forced_size:
            return self.native_size
        return self.default_size if imagesize is None else int(imagesize)


_PTH_HINT_IMAGENET = "preprocessing/create_imagenet_benchmark_datasets.py"

DATASETS = {
    "mnist": DatasetSpec(
        "mnist", im_dim=1, n_classes=10, native_size=28, forced_size=False, logit_alpha=1e-6, nvals_fixed=256,
        files=TorchvisionFiles("MNIST", "MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                      "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                               "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four .gz files, or their extracted idx files)",
                               gunzip=True)),
    "cifar10": DatasetSpec(
        "cifar10", im_dim=3, n_classes=10, native_size=32, forced_size=False, logit_alpha=0.05, nvals_fixed=256,
        files=TorchvisionFiles("CIFAR10", "cifar-10-batches-py", ("data_batch_1", "...", "data_batch_5", "test_batch"),
                               "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it there)"),
        crop="classification", flip=True),
    "svhn": DatasetSpec(
        "svhn", im_dim=3, n_classes=10, native_size=32, forced_size=False, logit_alpha=0.05, nvals_fixed=256,
        files=TorchvisionFiles("SVHN", ".", ("train_32x32.mat", "test_32x32.mat"), "http://ufldl.stanford.edu/housenumbers/",
                               split_arg=True),
        crop="always"),  # every task, as the paper (not only classification)
    "celebahq": DatasetSpec(
        "celebahq", im_dim=3, n_classes=1, native_size=256, forced_size=True, logit_alpha=0.05, nvals_fixed=None,
        files=PthFiles("celebahq/celeba256_train.pth", "celebahq/celeba256_validation.pth",
                       "preprocessing/extract_celeba_from_tfrecords.py"),
        file_levels=256, flip=True),
    "celeba_5bit": DatasetSpec(
        "celeba_5bit", im_dim=3, n_classes=1, native_size=64, forced_size=True, logit_alpha=0.05, nvals_fixed=32,
        # The reference uses the file's first 5000 images as its test set (they overlap train).
        files=PthFiles("celebahq64_5bit/celeba_full_64x64_5bit.pth", "celebahq64_5bit/celeba_full_64x64_5bit.pth",
                       "preprocessing/convert_to_pth.py celebahq64_5bit/celeba_full_64x64_5bit.npy", test_stop=5000),
        flip=True),
    "imagenet32": DatasetSpec(
        "imagenet32", im_dim=3, n_classes=1, native_size=32, forced_size=True, logit_alpha=0.05, nvals_fixed=256,
        files=PthFiles("imagenet32/train_32x32.pth", "imagenet32/valid_32x32.pth", _PTH_HINT_IMAGENET)),
    "imagenet64": DatasetSpec(
        "imagenet64", im_dim=3, n_classes=1, native_size=64, forced_size=True, logit_alpha=0.05, nvals_fixed=256,
        files=PthFiles("imagenet64/train_64x64.pth", "imagenet64/valid_64x64.pth", _PTH_HINT_IMAGENET)),
    "digits": DatasetSpec(
        "digits", im_dim=1, n_classes=10, native_size=8, forced_size=False, logit_alpha=0.05, nvals_fixed=17, default_size=8),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown --data {name!r}; choose from {', '.join(DATASETS)}") from None


def build_dataset(name: str, train: bool, dataroot: str = "data", imagesize: Optional[int] = None, nbits: int = 8,
                  task: str = "density", add_noise: bool = True, padding: int = 0, padding_dist: str = "uniform",
                  rcrop_pad_mode: str = "reflect", seed: int = 0, dequant: str = "exact") -> ImageLevelsDataset:
    """The train or test split of ``--data name`` as dequantised float images in [0, 1] and labels."""
    spec = get_spec(name)
    size = spec.resolve_size(imagesize)
    files = spec.files
    if files is None:
        source: Dataset = DigitsImages(train, size)
    elif isinstance(files, TorchvisionFiles):
        source = _TorchvisionImages(_torchvision(name, dataroot, train), size)
    else:
        path = os.path.join(dataroot, files.train if train else files.test)
        source = PthImages(path, files.script) if train else PthImages(path, files.script, 0, files.test_stop)
        expected = (spec.im_dim, size, size)
        if tuple(source.data.shape[1:]) != expected:
            raise DataNotFoundError(
                f"{path} holds {'x'.join(map(str, source.data.shape[1:]))} images, but --data {name} needs "
                f"{'x'.join(map(str, expected))}; rebuild it with {files.script}")
        if spec.file_levels is None and spec.nvals(nbits) < 256:  # files holding fewer levels (celeba_5bit)
            check_levels(source.data, spec.nvals(nbits), path, files.script)
    augment: list = []
    if train and (spec.crop == "always" or (spec.crop == "classification" and task in ("classification", "hybrid"))):
        augment.append(_random_crop(4, rcrop_pad_mode))
    if train and spec.flip:
        augment.append(_flip)
    levels_from = spec.file_levels or spec.nvals(nbits)
    return ImageLevelsDataset(source, spec.nvals(nbits), tuple(augment), add_noise, padding, padding_dist, seed,
                              levels_from=levels_from, dequant=dequant)
