"""Convert NHWC uint8 ``.npy`` image arrays into the NCHW uint8 ``.pth`` tensors that ``train_img.py`` reads.

Used for Flow++'s 5-bit CelebA 64x64 (``celeba_full_64x64_5bit.npy``, levels 0..31) and for ImageNet arrays::

    python preprocessing/convert_to_pth.py --max-value 31 data/celebahq64_5bit/celeba_full_64x64_5bit.npy
    # -> data/celebahq64_5bit/celeba_full_64x64_5bit.pth  (N x 3 x 64 x 64, uint8)

Each input is memory-mapped (``mmap_mode='r'``) and copied chunk by chunk into a temporary NCHW file that
``torch.save`` then streams out, so even a 15 GB array is never held in memory. The value range is checked
during that copy. Outputs are written atomically (temporary file, fsync, rename). Disk space needed while a
file converts: about twice its size on top of the input (temporary NCHW copy + the ``.pth``).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import List, Optional, Sequence

import numpy as np

if not __package__:  # run as a script (python preprocessing/convert_to_pth.py): import its folder as the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from preprocessing._common import InputError, OneLineArgumentParser, human_bytes, npy_nhwc_to_pth, run_cli  # noqa: E402

PROG = "convert_to_pth.py"


def load_nhwc(path: str, max_value: int = 255) -> np.ndarray:
    """Memory-maps ``path`` and checks that it holds NHWC uint8 images; raises :class:`InputError` if not.

    Only the header is checked here (cheap); the value range is checked while converting.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: not a readable .npy array file ({e})") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an archive object for .npz files
        raise InputError(f"{path}: is a .npz archive; expected a single .npy array (extract the array first)")
    if arr.dtype != np.uint8:
        raise InputError(f"{path}: dtype is {arr.dtype}; expected uint8 image levels 0..{max_value}")
    if arr.ndim != 4:
        raise InputError(f"{path}: array has shape {tuple(arr.shape)} (rank {arr.ndim}); expected rank 4, "
                         "images as [N, H, W, C]")
    if arr.shape[-1] not in (1, 3):
        hint = " (it looks like NCHW already; this script expects NHWC)" if arr.shape[1] in (1, 3) else ""
        raise InputError(f"{path}: array has shape {tuple(arr.shape)}, whose last axis (channels) is "
                         f"{arr.shape[-1]}; expected 1 or 3 channels in NHWC layout{hint}")
    if arr.shape[0] == 0:
        raise InputError(f"{path}: array holds no images (shape {tuple(arr.shape)})")
    return arr


def output_path(path: str, out_dir: Optional[str]) -> str:
    """``FILE.npy`` -> ``FILE.pth`` next to it, or in ``out_dir``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(out_dir if out_dir else os.path.dirname(os.path.abspath(path)), stem + ".pth")


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert NHWC uint8 .npy image arrays to NCHW uint8 .pth tensors (FILE.npy -> FILE.pth).",
        epilog="Example: %(prog)s --max-value 31 data/celebahq64_5bit/celeba_full_64x64_5bit.npy")
    p.add_argument("files", nargs="+", metavar="FILE.npy", help="uint8 arrays of shape [N, H, W, C], C = 1 or 3")
    p.add_argument("--out-dir", default=None,
                   help="folder for the .pth files (default: next to each input file)")
    p.add_argument("--max-value", type=int, default=255, metavar="V",
                   help="largest allowed level, e.g. 31 for 5-bit data (default: 255)")
    return p


def _main(argv: Optional[Sequence[str]]) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 < args.max_value <= 255:
        parser.error(f"--max-value must be in 1..255, got {args.max_value}")
    # Check every header before converting anything, so a bad last file does not fail an hour in.
    arrays: List[np.ndarray] = [load_nhwc(f, args.max_value) for f in args.files]
    outs = [output_path(f, args.out_dir) for f in args.files]
    if len(set(outs)) != len(outs):
        raise InputError(f"two inputs would write the same output file: {sorted(o for o in outs if outs.count(o) > 1)[0]}")
    for path, arr, out in zip(args.files, arrays, outs):
        npy_nhwc_to_pth(arr, out, args.max_value, name=path, desc=os.path.basename(path))
        n, h, w, c = arr.shape
        print(f"wrote {out}: {n} x {c} x {h} x {w} uint8 ({human_bytes(arr.nbytes)})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (0 on success)."""
    return run_cli(_main, argv, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
