"""Test setup: Triton's interpreter on machines without CUDA, markers, seeding.

TRITON_INTERPRET must be set before any kernel module imports triton.jit kernels, so it is set
here at conftest import, before tests import kvpo_kernels.
"""

import os
import random

import pytest

if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        _cuda = torch.cuda.is_available()
    except ImportError:
        _cuda = False
    if not _cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (legacy global RNG seeded for libraries that use it)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
