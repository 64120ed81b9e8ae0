"""preprocessing/convert_to_pth.py: NHWC .npy -> NCHW .pth, checked through resflows.datasets."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from resflows.datasets import PthImages, build_dataset

from .helpers import SCRIPTS, assert_error, assert_ok, leftovers, random_images, run_script

SCRIPT = "convert_to_pth.py"


def test_help():
    proc = run_script(SCRIPT, "--help")
    assert_ok(proc)
    assert "--max-value" in proc.stdout and "--out-dir" in proc.stdout


def test_celeba_5bit_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = random_images(rng, 7, (64, 64, 3), high=32)
    nhwc[0, 0, 0, 0], nhwc[1, 1, 1, 1] = 0, 31  # both ends of the 5-bit range
    folder = tmp_path / "celebahq64_5bit"
    folder.mkdir()
    np.save(folder / "celeba_full_64x64_5bit.npy", nhwc)

    assert_ok(run_script(SCRIPT, "--max-value", "31", folder / "celeba_full_64x64_5bit.npy"))

    pth = folder / "celeba_full_64x64_5bit.pth"
    assert oct(pth.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not left private like a temp file
    assert leftovers(tmp_path) == []
    # The file as train_img.py loads it: memory-mapped, weights only, NCHW uint8 and contiguous.
    raw = torch.load(pth, map_location="cpu", weights_only=True, mmap=True)
    assert raw.dtype == torch.uint8 and raw.shape == (7, 3, 64, 64) and raw.is_contiguous()
    expected = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    src = PthImages(str(pth))
    assert len(src) == 7
    for i in range(7):
        assert torch.equal(src[i][0], expected[i])
    # celeba_5bit's test split (the first 5000 images) without noise: x == levels / 31 exactly.
    test = build_dataset("celeba_5bit", train=False, dataroot=str(tmp_path), add_noise=False)
    assert len(test) == 7
    for i in range(7):
        x, y = test[i]
        assert y == 0 and torch.equal(x, expected[i].float() / 31)


def test_grey_and_out_dir_and_several_files(tmp_path):
    rng = np.random.default_rng(1)
    grey, rgb = random_images(rng, 3, (5, 4, 1)), random_images(rng, 2, (6, 6, 3))
    np.save(tmp_path / "grey.npy", grey)
    np.save(tmp_path / "rgb.npy", rgb)
    out = tmp_path / "out"

    assert_ok(run_script(SCRIPT, tmp_path / "grey.npy", tmp_path / "rgb.npy", "--out-dir", out))

    assert sorted(os.listdir(out)) == ["grey.pth", "rgb.pth"]
    for name, arr in (("grey", grey), ("rgb", rgb)):
        t = PthImages(str(out / f"{name}.pth")).data
        assert torch.equal(t, torch.from_numpy(arr).permute(0, 3, 1, 2))


def test_imagenet32_layout_through_build_dataset(tmp_path):
    # convert_to_pth.py also turns ImageNet .npy arrays into the files build_dataset reads.
    rng = np.random.default_rng(2)
    folder = tmp_path / "imagenet32"
    folder.mkdir()
    arrays = {"train_32x32": random_images(rng, 4, (32, 32, 3)), "valid_32x32": random_images(rng, 3, (32, 32, 3))}
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)

    assert_ok(run_script(SCRIPT, *(folder / f"{name}.npy" for name in arrays)))

    for train, name in ((True, "train_32x32"), (False, "valid_32x32")):
        ds = build_dataset("imagenet32", train=train, dataroot=str(tmp_path), add_noise=False)
        expected = torch.from_numpy(arrays[name]).permute(0, 3, 1, 2).float() / 255
        assert torch.equal(torch.stack([ds[i][0] for i in range(len(ds))]), expected)


@pytest.mark.parametrize("make, needles", [
    (lambda p: np.save(p, np.zeros((2, 4, 4, 3), np.float32)), ["dtype is float32", "expected uint8"]),
    (lambda p: np.save(p, np.zeros((2, 4, 4, 3), np.int64)), ["dtype is int64", "expected uint8"]),
    (lambda p: np.save(p, np.zeros((4, 4, 3), np.uint8)), ["rank 3", "expected rank 4"]),
    (lambda p: np.save(p, np.zeros((2, 4, 4, 4), np.uint8)), ["last axis (channels) is 4", "1 or 3 channels"]),
    (lambda p: np.save(p, np.zeros((2, 3, 4, 4), np.uint8)), ["last axis (channels) is 4", "NCHW already"]),
    (lambda p: np.save(p, np.zeros((0, 4, 4, 3), np.uint8)), ["no images"]),
    (lambda p: p.write_text("not an array"), ["not a readable .npy array file"]),
    (lambda p: np.savez(p, a=np.zeros((1, 2, 2, 3), np.uint8)), [".npz archive"]),
    (lambda p: None, ["no such file"]),
], ids=["float32", "int64", "rank3", "4channels", "nchw", "empty", "text", "npz", "missing"])
def test_bad_arrays(tmp_path, make, needles):
    path = tmp_path / "bad.npy"
    make(path)
    if path.with_suffix(".npy.npz").exists():  # np.savez appends .npz
        path.with_suffix(".npy.npz").rename(path)
    assert_error(run_script(SCRIPT, path), SCRIPT, str(path), *needles)
    assert not (tmp_path / "bad.pth").exists()


def test_out_of_range_levels(tmp_path):
    arr = np.full((6, 4, 4, 3), 31, np.uint8)
    arr[4, 2, 1, 0] = 200
    np.save(tmp_path / "five_bit.npy", arr)
    (tmp_path / "five_bit.pth").write_bytes(b"old")  # an earlier output must survive a failed run

    line = assert_error(run_script(SCRIPT, "--max-value", "31", tmp_path / "five_bit.npy"), SCRIPT,
                        str(tmp_path / "five_bit.npy"), "0..31", "image 4", "200")

    assert "--max-value" in line
    assert (tmp_path / "five_bit.pth").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_every_header_checked_before_any_conversion(tmp_path):
    np.save(tmp_path / "good.npy", np.zeros((2, 4, 4, 3), np.uint8))
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 4), np.uint8))
    assert_error(run_script(SCRIPT, tmp_path / "good.npy", tmp_path / "bad.npy"), SCRIPT, "bad.npy", "rank 3")
    assert not (tmp_path / "good.pth").exists()


def test_bad_max_value_is_a_usage_error(tmp_path):
    proc = run_script(SCRIPT, "--max-value", "300", tmp_path / "x.npy")
    assert proc.returncode == 2 and "--max-value must be in 1..255" in proc.stderr and "Traceback" not in proc.stderr


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_DATA and /proc (Linux)")
def test_large_array_is_never_copied_into_memory(tmp_path):
    """A 192 MiB array converts under a data limit of 96 MiB above what the libraries use: the conversion
    streams through memory-mapped files instead of holding a copy of the array.

    (RSS is not the measure: it also counts the mapped files' pages, which are page cache; torch.save maps
    the whole file while it computes the zip CRC. RLIMIT_DATA counts only the process's own memory.)"""
    n, shape = 16384, (64, 64, 3)  # 16384 x 12288 bytes = 192 MiB
    src = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, *shape))
    pattern = (np.arange(int(np.prod(shape)), dtype=np.int64) % 31).astype(np.uint8).reshape(shape)
    for start in range(0, n, 2048):  # fill in pieces so the test itself stays small too
        src[start : start + 2048] = pattern
        src[start : start + 2048, 0, 0, 0] = np.arange(start, start + 2048) % 32  # tell images apart
    src.flush()
    del src

    # RLIMIT_DATA caps private writable memory (heap, anonymous mmaps: where a copy would go) but not the
    # shared file mappings that memory-mapped arrays use. Libraries are imported before the limit is set.
    code = f"""
import resource, runpy, sys
sys.path.insert(0, {str(SCRIPTS)!r})
import numpy, torch, tqdm, _common
vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmData:'))
resource.setrlimit(resource.RLIMIT_DATA, (vm + (96 << 20), resource.RLIM_INFINITY))
sys.argv = ['convert_to_pth.py', '--max-value', '31', {str(tmp_path / 'big.npy')!r}]
runpy.run_path({str(SCRIPTS / SCRIPT)!r}, run_name='__main__')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert_ok(proc)

    out = torch.load(tmp_path / "big.pth", map_location="cpu", weights_only=True, mmap=True)
    src = np.load(tmp_path / "big.npy", mmap_mode="r")
    assert out.shape == (n, 3, 64, 64)
    for start in range(0, n, 2048):
        assert np.array_equal(out[start : start + 2048].numpy(), src[start : start + 2048].transpose(0, 3, 1, 2))
