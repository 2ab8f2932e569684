"""pytest fixtures shared by every benchmark suite (``pytest benchmarks``)."""

import pytest

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
