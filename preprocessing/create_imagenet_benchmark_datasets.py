"""Build the ImageNet 32x32 / 64x64 dataset files from the folders of PNGs of "downsampled ImageNet".

Input: folders ``train_32x32/``, ``valid_32x32/``, ``train_64x64/``, ``valid_64x64/`` of RGB PNG images,
by default under ``<dataroot>/imagenet32/`` and ``<dataroot>/imagenet64/`` (or under ``--input-root``).
Output, for each selected resolution R and split S, in ``<dataroot>/imagenetR/``:

* ``S_RxR.npy`` -- uint8 ``[N, R, R, 3]`` (NHWC), the images in sorted file-name order (skip with ``--no-npy``);
* ``S_RxR.pth`` -- uint8 ``[N, 3, R, R]`` (NCHW) tensor saved with ``torch.save``, read by ``train_img.py``.

Images are decoded one at a time with Pillow straight into a preallocated memory-mapped array, and the
``.pth`` is streamed from a memory-mapped NCHW copy, so memory use stays flat even for the 1.28 M training
images. Files are processed in sorted order (the original scripts used directory order, which depends on
the filesystem) so that the output is reproducible. Every output file is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

if not __package__:  # run as a script (python preprocessing/create_imagenet_benchmark_datasets.py): import its folder as the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from preprocessing._common import (
    CHUNK_BYTES,
    PTH_OVERHEAD,
    InputError,
    OneLineArgumentParser,
    atomic_output,
    check_free_space,
    flush_memmap,
    human_bytes,
    npy_nhwc_to_pth,
    open_memmap,
    release_pages,
    run_cli,
    save_nchw_pth,
    temp_path,
    )  # noqa: E402

PROG = "create_imagenet_benchmark_datasets.py"
RESOLUTIONS = (32, 64)
SPLITS = ("train", "valid")


def list_pngs(folder: str) -> List[str]:
    """All ``*.png`` files under ``folder`` (any depth), sorted by relative path for a reproducible order."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: no such folder (extract the downsampled-ImageNet PNG archive there)")
    found: List[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        # Dot files are skipped: archives made on macOS carry "._name.png" metadata files that are not images.
        found.extend(os.path.join(root, f) for f in files if f.lower().endswith(".png") and not f.startswith("."))
    if not found:
        raise InputError(f"{folder}: contains no .png files")
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def read_rgb(path: str, size: int) -> np.ndarray:
    """The ``size`` x ``size`` RGB image at ``path`` as a uint8 ``[H, W, 3]`` array.

    Anything else (another size, a grey-scale or RGBA image, an unreadable file) raises :class:`InputError`
    naming the file: converting silently would change the benchmark. So does a header claiming a huge image
    (Pillow's decompression-bomb guard), before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns (several lines) for images between its limit and twice that: make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.size != (size, size) or im.mode != "RGB":
                    raise InputError(f"{path}: image is {im.size[0]}x{im.size[1]} {im.mode}; "
                                     f"expected {size}x{size} RGB")
                return np.asarray(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{path}: header claims a huge image, refused as a possible decompression bomb ({e}); "
                         f"expected {size}x{size} RGB") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image file that Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's ways of saying "not a valid image"
        raise InputError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def decode_into(files: Sequence[str], out: np.ndarray, size: int, nchw: bool, desc: str) -> None:
    """Decodes ``files`` into ``out`` (``[N, H, W, 3]``, or ``[N, 3, H, W]`` if ``nchw``), one image at a time."""
    step = max(1, CHUNK_BYTES // out[0].nbytes)
    # `with` closes the bar before an error propagates, so the error message gets a line of its own.
    with tqdm(files, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for i, path in enumerate(bar):
            img = read_rgb(path, size)
            out[i] = img.transpose(2, 0, 1) if nchw else img
            if (i + 1) % step == 0:  # keep the resident set at one chunk of the output file
                release_pages(out[i + 1 - step : i + 1])


def build_split(files: Sequence[str], out_dir: str, split: str, size: int,
                write_npy: bool = True) -> Tuple[str, ...]:
    """Builds ``<out_dir>/<split>_<size>x<size>.pth`` (and ``.npy`` if ``write_npy``) from the PNG ``files``,
    in the given order. Returns the paths written.
    """
    n, name = len(files), f"{split}_{size}x{size}"
    npy_path, pth_path = os.path.join(out_dir, name + ".npy"), os.path.join(out_dir, name + ".pth")
    nbytes = n * size * size * 3
    # At the peak: the .npy (if written), a temporary NCHW copy and the .pth.
    check_free_space(out_dir, (3 if write_npy else 2) * nbytes + PTH_OVERHEAD,
                     f"building {name} ({n} images: {'the .npy, ' if write_npy else ''}a temporary copy and the .pth)")
    if write_npy:
        with atomic_output(npy_path) as tmp:
            nhwc = open_memmap(tmp, (n, size, size, 3), f"writing {name}.npy")
            try:
                decode_into(files, nhwc, size, nchw=False, desc=f"{name}: decode PNGs")
                flush_memmap(nhwc)
            finally:
                del nhwc  # unmap before the file is renamed or removed
        # Reopen the finished .npy read-only: the .pth is then built exactly from what is on disk.
        npy_nhwc_to_pth(np.load(npy_path, mmap_mode="r"), pth_path, name=npy_path, desc=name)
        return npy_path, pth_path
    # Without the .npy, decode straight into NCHW order: one temporary file instead of two.
    with temp_path(out_dir, name + ".pth", ".nchw.npy") as tmp:
        nchw = open_memmap(tmp, (n, 3, size, size), f"the temporary NCHW copy for {name}.pth")
        try:
            decode_into(files, nchw, size, nchw=True, desc=f"{name}: decode PNGs")
            nchw.flush()
            save_nchw_pth(nchw, pth_path, desc=f"{name}: write .pth")
        finally:
            del nchw
    return (pth_path,)


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build imagenet32/imagenet64 .npy (NHWC) and .pth (NCHW) files from downsampled-ImageNet PNGs.",
        epilog="Example: %(prog)s --resolution 32   # reads data/imagenet32/{train,valid}_32x32/*.png\n"
               "         writes data/imagenet32/{train,valid}_32x32.npy and .pth")
    p.add_argument("--dataroot", default="data", help="dataset root of train_img.py (default: data)")
    p.add_argument("--input-root", default=None,
                   help="folder holding the PNG folders train_32x32/, valid_32x32/, train_64x64/, valid_64x64/ "
                        "(default: <dataroot>/imagenet32 for 32x32 and <dataroot>/imagenet64 for 64x64)")
    p.add_argument("--resolution", type=int, nargs="+", choices=RESOLUTIONS, default=list(RESOLUTIONS),
                   help="resolution(s) to build (default: 32 64)")
    p.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="split(s) to build (default: train valid)")
    p.add_argument("--no-npy", action="store_true",
                   help="write only the .pth files (saves disk space; the .npy arrays are not used for training)")
    return p


def _main(argv: Optional[Sequence[str]]) -> None:
    args = _parser().parse_args(argv)
    jobs: Dict[Tuple[int, str], str] = {}
    for size in dict.fromkeys(args.resolution):  # keeps the order, drops repeats
        for split in dict.fromkeys(args.split):
            root = args.input_root or os.path.join(args.dataroot, f"imagenet{size}")
            jobs[size, split] = os.path.join(root, f"{split}_{size}x{size}")
    # List every folder first: a missing or empty one fails at once, not after an hour spent on the others.
    files = {job: list_pngs(src) for job, src in jobs.items()}
    for (size, split), pngs in files.items():
        out_dir = os.path.join(args.dataroot, f"imagenet{size}")
        for path in build_split(pngs, out_dir, split, size, write_npy=not args.no_npy):
            print(f"wrote {path} ({human_bytes(os.path.getsize(path))})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (0 on success)."""
    return run_cli(_main, argv, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
