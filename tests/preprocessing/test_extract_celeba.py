"""preprocessing/extract_celeba_from_tfrecords.py: Glow's CelebA-HQ TFRecords -> celeba256_*.pth."""
import struct

import numpy as np
import pytest
import torch

from preprocessing import extract_celeba_from_tfrecords as tfr
from resflows.datasets import PthImages, build_dataset

from .helpers import (
    assert_error,
    assert_ok,
    bytes_feature,
    celeba_example,
    crc32c,
    example,
    frame,
    int64_feature,
    leftovers,
    random_images,
    run_script,
    write_tfrecord,
)

SCRIPT = "extract_celeba_from_tfrecords.py"
SHAPE = (256, 256, 3)


def _shard(root, split, index, total):
    return root / split / f"{split}-r08-s-{index:04d}-of-{total:04d}.tfrecords"


def _write_split(root, split, per_shard, rng):
    """Writes shards holding ``per_shard[i]`` random images each; returns the images in file order."""
    images = []
    # Written in reverse so that creation (often directory) order differs from name order.
    for i in reversed(range(len(per_shard))):
        imgs = random_images(rng, per_shard[i], SHAPE)
        write_tfrecord(_shard(root, split, i, len(per_shard)), [celeba_example(img, label=7) for img in imgs])
        images.insert(0, imgs)
    return np.concatenate(images)


@pytest.fixture
def celeba_tfr(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "celeba-tfr"
    return root, {"train": _write_split(root, "train", [2, 1, 2], rng),
                  "validation": _write_split(root, "validation", [2], rng)}


def test_help():
    proc = run_script(SCRIPT, "--help")
    assert_ok(proc)
    assert "--input-dir" in proc.stdout and "--dataroot" in proc.stdout and "--split" in proc.stdout


def test_crc32c():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value (helper used by the writer)
    assert tfr.crc32c_python(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 5
    assert tfr.crc32c_impl()[0](data) == tfr.crc32c_python(data) == crc32c(data)


def test_round_trip(tmp_path, celeba_tfr):
    root, images = celeba_tfr
    data = tmp_path / "data"

    assert_ok(run_script(SCRIPT, "--input-dir", root, "--dataroot", data))

    assert sorted(p.name for p in (data / "celebahq").iterdir()) == ["celeba256_train.pth", "celeba256_validation.pth"]
    assert leftovers(tmp_path) == []
    for split, imgs in images.items():
        src = PthImages(str(data / "celebahq" / f"celeba256_{split}.pth"))
        assert src.data.shape == (len(imgs), 3, 256, 256) and src.data.is_contiguous()
        assert torch.equal(src.data, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    # The validation split as training code sees it (no flip there): levels / 255 with nbits=8.
    ds = build_dataset("celebahq", train=False, dataroot=str(data), nbits=8, add_noise=False)
    for i, img in enumerate(images["validation"]):
        assert torch.equal(ds[i][0], torch.from_numpy(img).permute(2, 0, 1).float() / 255)


def test_split_selection(tmp_path, celeba_tfr):
    root, images = celeba_tfr
    assert_ok(run_script(SCRIPT, "--input-dir", root, "--dataroot", tmp_path / "data", "--split", "validation"))
    assert [p.name for p in (tmp_path / "data" / "celebahq").iterdir()] == ["celeba256_validation.pth"]


def _corrupt(path, offset):
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("where, kind", [
    (lambda size: 3, "length CRC"),  # the length itself: its CRC no longer matches
    (lambda size: 8, "length CRC"),  # the stored length CRC
    (lambda size: 12 + 100, "data CRC"),  # an image byte
    (lambda size: size - 2, "data CRC"),  # the stored data CRC
], ids=["length", "length-crc", "data", "data-crc"])
def test_corrupt_record_names_file_and_offset(tmp_path, celeba_tfr, where, kind):
    root, _ = celeba_tfr
    shard = _shard(root, "train", 2, 3)
    record = len(frame(celeba_example(np.zeros(SHAPE, np.uint8), label=7)))  # every record has this size
    _corrupt(shard, record + where(record))  # in the second record
    (tmp_path / "data" / "celebahq").mkdir(parents=True)
    (tmp_path / "data" / "celebahq" / "celeba256_train.pth").write_bytes(b"old")

    assert_error(run_script(SCRIPT, "--input-dir", root, "--dataroot", tmp_path / "data"), SCRIPT,
                 str(shard), f"corrupt record at byte offset {record}:", kind)

    assert (tmp_path / "data" / "celebahq" / "celeba256_train.pth").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_truncated_file(tmp_path, celeba_tfr):
    root, _ = celeba_tfr
    shard = _shard(root, "validation", 0, 1)
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-10])
    second = len(blob) // 2
    args = ("--input-dir", root, "--dataroot", tmp_path / "data", "--split", "validation")
    assert_error(run_script(SCRIPT, *args), SCRIPT, str(shard), f"truncated record at byte offset {second}")
    shard.write_bytes(blob + b"\x01\x02\x03")  # a partial header after the last record
    assert_error(run_script(SCRIPT, *args), SCRIPT, str(shard), f"truncated record at byte offset {len(blob)}")


@pytest.mark.parametrize("payload, needles", [
    (b"\xff\xff\xff", ["not a valid tf.train.Example"]),
    (example({"shape": int64_feature(*SHAPE)}), ["expected a 'data' feature", "features present: shape"]),
    (example({"shape": int64_feature(128, 128, 3), "data": bytes_feature(b"\x00" * 49152)}), ["image shape is [128, 128, 3]"]),
    (example({"data": bytes_feature(b"\x00" * 100)}), ["image data has 100 bytes", "expected 196608"]),
], ids=["garbage", "no-data", "shape", "size"])
def test_bad_example(tmp_path, payload, needles):
    shard = _shard(tmp_path / "tfr", "train", 0, 1)
    offsets = write_tfrecord(shard, [celeba_example(np.zeros(SHAPE, np.uint8)), payload])
    assert_error(run_script(SCRIPT, "--input-dir", tmp_path / "tfr", "--split", "train", "--dataroot", tmp_path),
                 SCRIPT, str(shard), f"record at byte offset {offsets[1]}", *needles)


def test_missing_shard_and_missing_folder(tmp_path, celeba_tfr):
    root, _ = celeba_tfr
    _shard(root, "train", 1, 3).unlink()
    assert_error(run_script(SCRIPT, "--input-dir", root, "--dataroot", tmp_path / "data"), SCRIPT,
                 str(root / "train"), "expected 3 shards, found 2", "train-r08-s-0001-of-0003.tfrecords")
    assert_error(run_script(SCRIPT, "--input-dir", tmp_path / "nowhere", "--dataroot", tmp_path / "data"), SCRIPT,
                 str(tmp_path / "nowhere" / "train"), "no such folder")
    assert not (tmp_path / "data").exists()


def test_length_crc_is_over_the_length_bytes():
    # Guards the helper writer against drifting from the format the reader expects.
    rec = frame(b"abc")
    assert struct.unpack("<Q", rec[:8])[0] == 3 and rec[12:15] == b"abc"
    assert struct.unpack("<I", rec[8:12])[0] == tfr.masked_crc32c(rec[:8])
    assert struct.unpack("<I", rec[15:19])[0] == tfr.masked_crc32c(b"abc")
