"""What the end-to-end tests of the entry points share: a tiny train_img.py run and calling a script's
``main`` the way a shell would."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import train_img

# A train_img.py run small enough for a test: the bundled 8x8 digits, two tiny scales, single process.
TINY = ["--data", "digits", "--nblocks", "1-1", "--idim", "8", "--fc-idim", "16", "--batchsize", "50",
        "--nworkers", "0", "--print-freq", "1", "--vis-freq", "1000", "--seed", "1"]


def cli(argv: Sequence, capsys, main: Optional[Callable[[Sequence[str]], int]] = None) -> Tuple[int, str, str]:
    """``main(argv)`` (train_img.py's by default; argv items made strings) -> (exit code, stdout, stderr),
    an argparse exit counting as its code."""
    main = main or train_img.main
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_ok(argv: Sequence, capsys, main: Optional[Callable[[Sequence[str]], int]] = None) -> str:
    """:func:`cli` that must exit 0; returns stdout."""
    code, out, err = cli(argv, capsys, main)
    assert code == 0, err
    return out


def read_reference(path) -> List[Tuple[str, Tuple[int, ...], str]]:
    """A state_dict key list written by the paper's (or the i-DenseNets fork's) code: ``key<TAB>shape<TAB>dtype``
    lines -> (key, shape, dtype)."""
    out = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        out.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return out


def assert_same_training_state(path_a, path_b) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Two checkpoints hold bitwise the same weights, EMA weights and optimiser state (exact resume);
    returns both, loaded."""
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][pid][k])), (pid, k)
    return a, b
