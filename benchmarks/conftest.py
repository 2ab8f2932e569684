"""pytest fixtures shared by every benchmark suite (``pytest benchmarks``)."""

import pytest
import torch

from benchmarks.harness import Recorder, bench_device


@pytest.fixture(scope="session")
def recorder():
    rec = Recorder()
    yield rec
    for path in rec.write():
        print(f"\nbenchmark results written to {path}")


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture
def one_cpu_thread(device):
    """Run the test on one CPU thread (small models: thread overhead dominates), then restore."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
