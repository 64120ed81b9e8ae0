"""Build the CelebA-HQ 256x256 dataset files from Glow's TFRecords, without TensorFlow.

Input: the extracted ``celeba-tfr.tar`` of Glow (default ``data/celeba-tfr``), i.e.
``train/train-r08-s-XXXX-of-0120.tfrecords`` and ``validation/validation-r08-s-XXXX-of-0040.tfrecords``.
Output: ``<dataroot>/celebahq/celeba256_train.pth`` and ``celeba256_validation.pth``, uint8 tensors
``[N, 3, 256, 256]`` saved with ``torch.save``.

A TFRecord file is a sequence of records framed as::

    uint64 length (little-endian) | uint32 masked CRC-32C of those 8 bytes | data | uint32 masked CRC-32C of data

where ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)``. Both CRCs are verified, and a
corrupt or truncated record is reported with its file and byte offset. Each record's data is a serialized
``tf.train.Example`` whose ``data`` feature holds the raw 256x256x3 image (HWC bytes); it is decoded with
the ``protobuf`` package (installed with tensorboard) from a schema declared below, so TensorFlow is not needed.

CRC-32C is computed by ``google-crc32c`` (C code) when it is installed, else in pure Python (about ten
minutes for the 6 GB of CelebA-HQ). Shards are read in sorted name order so the output order is
reproducible; the records are counted first (headers only) so the output is preallocated once, as a
memory-mapped file, and at most one image is in memory at a time.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import struct
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

if not __package__:  # run as a script (python preprocessing/extract_celeba_from_tfrecords.py): import its folder as the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from preprocessing._common import (
    CHUNK_BYTES,
    PTH_OVERHEAD,
    InputError,
    OneLineArgumentParser,
    check_free_space,
    format_list,
    human_bytes,
    open_memmap,
    release_pages,
    run_cli,
    save_nchw_pth,
    temp_path,
    )  # noqa: E402

PROG = "extract_celeba_from_tfrecords.py"
SPLITS = ("train", "validation")
IMAGE_SHAPE = (256, 256, 3)  # Glow's "r08" files: 2**8 pixels a side
HEADER = struct.Struct("<QI")  # record length, masked CRC-32C of the length's 8 bytes
FOOTER = struct.Struct("<I")  # masked CRC-32C of the data
_MASK_DELTA = 0xA282EAD8


# ------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli)
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _crc32c_table() -> Tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):  # reflected polynomial 0x1EDC6F41
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def crc32c_python(data: bytes) -> int:
    """CRC-32C of ``data`` in pure Python (the fallback when google-crc32c is missing; ~10 MB/s)."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@functools.lru_cache(maxsize=None)
def crc32c_impl() -> Tuple[Callable[[bytes], int], str]:
    """The fastest available CRC-32C function and its name (``"google-crc32c"`` or ``"python"``)."""
    try:
        import google_crc32c
    except ImportError:
        return crc32c_python, "python"
    # The package falls back to its own pure-Python code when its C extension is missing; ours is as good.
    if getattr(google_crc32c, "implementation", "c") != "c":
        return crc32c_python, "python"
    return google_crc32c.value, "google-crc32c"


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = crc32c_impl()[0](data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# TFRecord framing
# ------------------------------------------------------------------------------------------------
def _read_header(f, path: str, offset: int) -> Optional[int]:
    """Reads and verifies one record header at ``offset``; returns the data length, or None at end of file."""
    header = f.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise InputError(f"{path}: truncated record at byte offset {offset}: the file ends inside the "
                         f"{HEADER.size}-byte record header")
    length, stored = HEADER.unpack(header)
    computed = masked_crc32c(header[:8])
    if computed != stored:
        raise InputError(f"{path}: corrupt record at byte offset {offset}: length CRC mismatch "
                         f"(stored 0x{stored:08x}, computed 0x{computed:08x})")
    return length


def count_records(path: str) -> int:
    """Number of records in a TFRecord file, reading only the headers (length CRCs are verified)."""
    size = os.path.getsize(path)
    n = offset = 0
    with open(path, "rb") as f:
        while (length := _read_header(f, path, offset)) is not None:
            end = offset + HEADER.size + length + FOOTER.size
            if end > size:
                raise InputError(f"{path}: truncated record at byte offset {offset}: it needs {length} data bytes "
                                 f"and a CRC, but the file ends {end - size} bytes short")
            f.seek(end)
            n, offset = n + 1, end
    return n


def iter_records(path: str) -> Iterator[Tuple[int, bytes]]:
    """Yields ``(byte offset, data)`` for each record of a TFRecord file, verifying both CRCs."""
    offset = 0
    with open(path, "rb") as f:
        while (length := _read_header(f, path, offset)) is not None:
            data, footer = f.read(length), f.read(FOOTER.size)
            if len(data) < length or len(footer) < FOOTER.size:
                raise InputError(f"{path}: truncated record at byte offset {offset}: the file ends inside "
                                 "the record's data or data CRC")
            (stored,) = FOOTER.unpack(footer)
            computed = masked_crc32c(data)
            if computed != stored:
                raise InputError(f"{path}: corrupt record at byte offset {offset}: data CRC mismatch "
                                 f"(stored 0x{stored:08x}, computed 0x{computed:08x})")
            yield offset, data
            offset += HEADER.size + length + FOOTER.size


# ------------------------------------------------------------------------------------------------
# tf.train.Example
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def example_class() -> type:
    """The ``tf.train.Example`` message class, built from its schema with the ``protobuf`` package.

    The schema (tensorflow/core/example/{example,feature}.proto) is declared here, in a private descriptor
    pool, because TensorFlow is not installed and tensorboard no longer ships ``example_pb2``; the parsing
    itself is protobuf's (C-accelerated) code.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="resflows/tf_example.proto", package="tensorflow",
                                               syntax="proto3")

    def field(msg, name: str, number: int, ftype: int, repeated: bool = False, type_name: str = "",
              oneof: Optional[int] = None) -> None:
        f = msg.field.add(name=name, number=number, type=ftype,
                          label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof

    field(proto.message_type.add(name="BytesList"), "value", 1, F.TYPE_BYTES, repeated=True)
    field(proto.message_type.add(name="FloatList"), "value", 1, F.TYPE_FLOAT, repeated=True)
    field(proto.message_type.add(name="Int64List"), "value", 1, F.TYPE_INT64, repeated=True)
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    field(feature, "bytes_list", 1, F.TYPE_MESSAGE, type_name=".tensorflow.BytesList", oneof=0)
    field(feature, "float_list", 2, F.TYPE_MESSAGE, type_name=".tensorflow.FloatList", oneof=0)
    field(feature, "int64_list", 3, F.TYPE_MESSAGE, type_name=".tensorflow.Int64List", oneof=0)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")  # map<string, Feature> feature = 1;
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    field(features, "feature", 1, F.TYPE_MESSAGE, repeated=True, type_name=".tensorflow.Features.FeatureEntry")
    field(proto.message_type.add(name="Example"), "features", 1, F.TYPE_MESSAGE, type_name=".tensorflow.Features")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def decode_image(data: bytes, path: str, offset: int) -> np.ndarray:
    """The HWC uint8 image of one serialized Example (``data`` feature), checked against :data:`IMAGE_SHAPE`."""
    from google.protobuf.message import DecodeError

    where = f"{path}: record at byte offset {offset}"
    example = example_class()()
    try:
        example.ParseFromString(data)
    except DecodeError as e:
        raise InputError(f"{where} is not a valid tf.train.Example ({e})") from None
    features = example.features.feature
    if "shape" in features:  # checked first: a wrong shape explains a wrong data size
        shape = tuple(features["shape"].int64_list.value)
        if shape != IMAGE_SHAPE:
            raise InputError(f"{where}: image shape is {list(shape)}; expected {list(IMAGE_SHAPE)} "
                             "(use the r08 files of celeba-tfr)")
    if "data" not in features or features["data"].WhichOneof("kind") != "bytes_list" \
            or len(features["data"].bytes_list.value) != 1:
        raise InputError(f"{where}: expected a 'data' feature holding one bytes value (the raw image); "
                         f"features present: {', '.join(sorted(features)) or 'none'}")
    raw = features["data"].bytes_list.value[0]
    if len(raw) != int(np.prod(IMAGE_SHAPE)):
        raise InputError(f"{where}: image data has {len(raw)} bytes; expected {int(np.prod(IMAGE_SHAPE))} "
                         f"for a {'x'.join(map(str, IMAGE_SHAPE))} uint8 image")
    return np.frombuffer(raw, dtype=np.uint8).reshape(IMAGE_SHAPE)


# ------------------------------------------------------------------------------------------------
# Building the .pth files
# ------------------------------------------------------------------------------------------------
def find_shards(folder: str, split: str) -> List[str]:
    """The shard files ``<split>-r08-s-IIII-of-NNNN.tfrecords`` in ``folder``, sorted; all N must be there."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such folder (extract Glow's celeba-tfr.tar and pass its folder "
                         "with --input-dir)")
    pattern = re.compile(rf"{re.escape(split)}-r08-s-(\d+)-of-(\d+)\.tfrecords")
    shards = {}
    for name in os.listdir(folder):
        m = pattern.fullmatch(name)
        if m:
            shards[name] = (int(m.group(1)), int(m.group(2)))
    if not shards:
        raise InputError(f"{folder}: contains no {split}-r08-s-*-of-*.tfrecords files")
    # A missing shard would silently shrink the dataset; the "-of-NNNN" in the names says how many there are.
    totals = {total for _, total in shards.values()}
    if len(totals) != 1:
        raise InputError(f"{folder}: shard names disagree on the shard count ({sorted(totals)})")
    total = totals.pop()
    present = {index for index, _ in shards.values()}
    missing = [f"{split}-r08-s-{i:04d}-of-{total:04d}.tfrecords" for i in range(total) if i not in present]
    if missing or len(shards) != total:
        raise InputError(f"{folder}: expected {total} shards, found {len(shards)}; missing: "
                         f"{format_list(missing) or 'none (duplicate indices)'}")
    return [os.path.join(folder, name) for name in sorted(shards)]


def extract_split(shards: Sequence[str], out_path: str, desc: str = "") -> int:
    """Writes the images of all records of ``shards`` (in order) to ``out_path`` as NCHW uint8; returns N."""
    # Bars are closed by `with` before an error propagates, so the error message gets a line of its own.
    with tqdm(shards, desc=f"{desc}: count records", unit="file", dynamic_ncols=True) as bar:
        n = sum(count_records(s) for s in bar)
    if n == 0:
        raise InputError(f"{os.path.dirname(shards[0])}: the {len(shards)} shard files hold no records")
    h, w, c = IMAGE_SHAPE
    folder, base = os.path.split(os.path.abspath(out_path))
    check_free_space(folder, 2 * n * h * w * c + PTH_OVERHEAD,
                     f"writing {base} ({n} images: a temporary copy, then the .pth)")
    with temp_path(folder, base, ".nchw.npy") as tmp:
        out = open_memmap(tmp, (n, c, h, w), f"the temporary copy of the {n} images for {base}")
        try:
            i, step = 0, max(1, CHUNK_BYTES // out[0].nbytes)
            with tqdm(total=n, desc=f"{desc}: extract images", unit="img", dynamic_ncols=True) as bar:
                for shard in shards:
                    for offset, data in iter_records(shard):
                        if i == n:  # the file grew since it was counted
                            raise InputError(f"{shard}: changed while being read (more records than counted)")
                        out[i] = decode_image(data, shard, offset).transpose(2, 0, 1)
                        i += 1
                        if i % step == 0:  # keep the resident set at one chunk of the output file
                            release_pages(out[i - step : i])
                        bar.update(1)
            if i != n:
                raise InputError(f"{os.path.dirname(shards[0])}: shard files changed while being read "
                                 f"({i} records read, {n} counted)")
            out.flush()
            save_nchw_pth(out, out_path, desc=f"{desc}: write .pth")
        finally:
            del out  # unmap before the temporary file is removed
    return n


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Extract CelebA-HQ 256x256 from Glow's TFRecords (celeba-tfr) into "
                    "<dataroot>/celebahq/celeba256_{train,validation}.pth, without TensorFlow.",
        epilog="Example: %(prog)s --input-dir data/celeba-tfr --dataroot data")
    p.add_argument("--input-dir", default=os.path.join("data", "celeba-tfr"),
                   help="folder of the extracted celeba-tfr.tar, holding train/ and validation/ "
                        "(default: data/celeba-tfr)")
    p.add_argument("--dataroot", default="data", help="dataset root of train_img.py (default: data)")
    p.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="split(s) to build (default: train validation)")
    return p


def _main(argv: Optional[Sequence[str]]) -> None:
    args = _parser().parse_args(argv)
    splits = list(dict.fromkeys(args.split))
    # Check every split's shard list before the long extraction starts.
    shards = {split: find_shards(os.path.join(args.input_dir, split), split) for split in splits}
    if crc32c_impl()[1] == "python":
        print(f"{PROG}: note: google-crc32c is not installed, so CRCs are checked in pure Python (about ten "
              "minutes for all of CelebA-HQ); pip install google-crc32c makes it fast", file=sys.stderr)
    for split in splits:
        out_path = os.path.join(args.dataroot, "celebahq", f"celeba256_{split}.pth")
        n = extract_split(shards[split], out_path, desc=split)
        print(f"wrote {out_path}: {n} x 3 x 256 x 256 uint8 ({human_bytes(os.path.getsize(out_path))})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (0 on success)."""
    return run_cli(_main, argv, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
