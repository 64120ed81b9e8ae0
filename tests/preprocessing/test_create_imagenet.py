"""preprocessing/create_imagenet_benchmark_datasets.py: PNG folders -> .npy (NHWC) and .pth (NCHW)."""
import numpy as np
import pytest
import torch
from PIL import Image

from resflows.datasets import PthImages, build_dataset

from .helpers import assert_error, assert_ok, leftovers, random_images, run_script

SCRIPT = "create_imagenet_benchmark_datasets.py"


def _write_pngs(folder, images, names):
    for img, name in zip(images, names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


def _sorted_images(images, names):
    return np.stack([img for _, img in sorted(zip(names, images), key=lambda t: t[0])])


def test_help():
    proc = run_script(SCRIPT, "--help")
    assert_ok(proc)
    for option in ("--dataroot", "--input-root", "--resolution", "--split", "--no-npy"):
        assert option in proc.stdout


def test_both_resolutions_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    # Names are written out of order and one sits in a subfolder: the output follows sorted paths.
    names = ["n02_b.png", "n01_a.png", "sub/n00_z.png", "n03_c.png"]
    expected = {}
    for size in (32, 64):
        for split, count in (("train", 4), ("valid", 2)):
            images = random_images(rng, count, (size, size, 3))
            _write_pngs(tmp_path / f"imagenet{size}" / f"{split}_{size}x{size}", images, names[:count])
            expected[size, split] = _sorted_images(images, names[:count])
    (tmp_path / "imagenet32" / "train_32x32" / "._n01_a.png").write_bytes(b"macOS metadata")  # skipped

    assert_ok(run_script(SCRIPT, "--dataroot", tmp_path))

    assert leftovers(tmp_path) == ["._n01_a.png"]
    for (size, split), imgs in expected.items():
        folder = tmp_path / f"imagenet{size}"
        npy = np.load(folder / f"{split}_{size}x{size}.npy")
        assert npy.dtype == np.uint8 and np.array_equal(npy, imgs)  # NHWC, sorted order
        pth = PthImages(str(folder / f"{split}_{size}x{size}.pth"))
        assert torch.equal(pth.data, torch.from_numpy(imgs).permute(0, 3, 1, 2))
        # What training sees without dequantisation noise: levels / 255.
        ds = build_dataset(f"imagenet{size}", train=split == "train", dataroot=str(tmp_path), add_noise=False)
        assert len(ds) == len(imgs)
        for i in range(len(ds)):
            x, y = ds[i]
            assert y == 0 and torch.equal(x, torch.from_numpy(imgs[i]).permute(2, 0, 1).float() / 255)


def test_selection_input_root_and_no_npy(tmp_path):
    rng = np.random.default_rng(1)
    raw, data = tmp_path / "raw", tmp_path / "data"
    images = random_images(rng, 3, (64, 64, 3))
    _write_pngs(raw / "valid_64x64", images, ["2.png", "1.png", "3.png"])
    # Only 64x64 valid is asked for: the missing train_64x64 and 32x32 folders are not needed.
    assert_ok(run_script(SCRIPT, "--dataroot", data, "--input-root", raw, "--resolution", "64",
                         "--split", "valid", "--no-npy"))

    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == ["imagenet64", "imagenet64/valid_64x64.pth"]
    pth = PthImages(str(data / "imagenet64" / "valid_64x64.pth")).data
    assert torch.equal(pth, torch.from_numpy(_sorted_images(images, ["2.png", "1.png", "3.png"])).permute(0, 3, 1, 2))


@pytest.mark.parametrize("bad, needles", [
    (lambda p: Image.new("RGB", (16, 32)).save(p), ["image is 16x32 RGB", "expected 32x32 RGB"]),
    (lambda p: Image.new("L", (32, 32)).save(p), ["image is 32x32 L", "expected 32x32 RGB"]),
    (lambda p: Image.new("RGBA", (32, 32)).save(p), ["image is 32x32 RGBA", "expected 32x32 RGB"]),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n broken"), ["not an image file that Pillow can read"]),
    (lambda p: Image.new("RGB", (32, 32)).save(p, format="PNG") or p.write_bytes(p.read_bytes()[:60]),
     ["cannot read image"]),
], ids=["size", "grey", "rgba", "not-png", "truncated"])
def test_bad_image_is_named(tmp_path, bad, needles):
    rng = np.random.default_rng(2)
    folder = tmp_path / "imagenet32" / "train_32x32"
    _write_pngs(folder, random_images(rng, 2, (32, 32, 3)), ["a.png", "c.png"])
    bad(folder / "b.png")
    (tmp_path / "imagenet32" / "train_32x32.pth").write_bytes(b"old")  # must survive the failed run

    assert_error(run_script(SCRIPT, "--dataroot", tmp_path, "--resolution", "32", "--split", "train"), SCRIPT,
                 str(folder / "b.png"), *needles)

    assert (tmp_path / "imagenet32" / "train_32x32.pth").read_bytes() == b"old"
    assert not (tmp_path / "imagenet32" / "train_32x32.npy").exists()
    assert leftovers(tmp_path) == []


def test_missing_or_empty_folder_fails_before_any_work(tmp_path):
    _write_pngs(tmp_path / "imagenet32" / "train_32x32", random_images(np.random.default_rng(3), 1, (32, 32, 3)),
                ["a.png"])
    missing = tmp_path / "imagenet32" / "valid_32x32"
    assert_error(run_script(SCRIPT, "--dataroot", tmp_path, "--resolution", "32"), SCRIPT, str(missing),
                 "no such folder")
    assert not (tmp_path / "imagenet32" / "train_32x32.npy").exists()  # train was not built first

    missing.mkdir()
    (missing / "readme.txt").write_text("no images here")
    assert_error(run_script(SCRIPT, "--dataroot", tmp_path, "--resolution", "32"), SCRIPT, str(missing),
                 "contains no .png files")
