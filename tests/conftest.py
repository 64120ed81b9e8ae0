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
