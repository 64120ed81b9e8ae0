"""Helpers for the preprocessing tests: running the scripts, checking their errors, writing TFRecords.

The TFRecord writer and the Example encoder here are written independently of the reader in
preprocessing/extract_celeba_from_tfrecords.py (own CRC table, hand-encoded protobuf), so a shared mistake
cannot make the round trip pass.
"""
from __future__ import annotations

import pathlib
import struct
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "preprocessing"


def run_script(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Runs ``preprocessing/<name>`` with ``args`` in a fresh interpreter; output captured as text."""
    cmd = [sys.executable, str(SCRIPTS / name), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr


def assert_error(proc: subprocess.CompletedProcess, script: str, *needles: str) -> str:
    """Checks the documented failure: exit 1, no traceback, a last stderr line ``<script>: error: ...``
    containing every needle. Returns that line."""
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{script}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def leftovers(folder: pathlib.Path) -> List[str]:
    """Temporary files left in ``folder`` (the scripts' temporaries are dot files)."""
    return sorted(p.name for p in folder.rglob(".*") if p.is_file())


# ------------------------------------------------------------------------------------------------
# CRC-32C and TFRecord framing
# ------------------------------------------------------------------------------------------------
def _table() -> List[int]:
    poly, table = 0x82F63B78, []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ (poly & -(n & 1))
        table.append(n)
    return table


_TABLE = _table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord record around ``data``."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked(crc32c(length))) + data + struct.pack("<I", masked(crc32c(data)))


def write_tfrecord(path: pathlib.Path, payloads: Sequence[bytes]) -> List[int]:
    """Writes the records; returns each record's byte offset."""
    offsets, blob = [], b""
    for p in payloads:
        offsets.append(len(blob))
        blob += frame(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return offsets


# ------------------------------------------------------------------------------------------------
# tf.train.Example, encoded by hand (protobuf wire format)
# ------------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 values are encoded as their two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited field (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bytes_feature(*values: bytes) -> bytes:
    return _field(1, b"".join(_field(1, v) for v in values))  # Feature.bytes_list = BytesList{value}


def int64_feature(*values: int) -> bytes:
    return _field(3, _field(1, b"".join(_varint(v) for v in values)))  # Feature.int64_list, packed


def example(features: Dict[str, bytes]) -> bytes:
    """Serialized Example{features: Features{feature: map<string, Feature>}} with encoded Feature payloads."""
    entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, v)) for k, v in features.items())
    return _field(1, entries)


def celeba_example(img: np.ndarray, label: int = 0) -> bytes:
    """An Example as in Glow's celeba-tfr: raw HWC bytes, shape and label."""
    return example({"shape": int64_feature(*img.shape), "data": bytes_feature(img.tobytes()),
                    "label": int64_feature(label)})


def random_images(rng: np.random.Generator, n: int, shape: Tuple[int, ...], high: int = 256) -> np.ndarray:
    return rng.integers(0, high, size=(n, *shape), dtype=np.uint8)
