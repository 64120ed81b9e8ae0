"""Test set-up: CPU only, deterministic seeds, paths to the shared reference data."""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests run on CPU only, even on a GPU machine

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


# A copy of ../shared/reference (facts produced by the paper's code), committed so CI has it.
REFERENCE = REPO / "tests" / "reference"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def reference_dir() -> pathlib.Path:
    return REFERENCE


@pytest.fixture
def offline(monkeypatch):
    """No dataset downloads: a missing file is an error naming where it goes (RESFLOWS_OFFLINE)."""
    monkeypatch.setenv("RESFLOWS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One torch thread: for small models thread synchronisation costs more than it saves (several times
    more on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
