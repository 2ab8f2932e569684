"""copy_pages: batched copy-on-write page copies, every backend against eager indexing.

CPU shape: 4 layers, pages of 390 tokens x 12 heads x 128 (a Wan frame of 1560 tokens cut by 4),
bf16, 64 pages in the pool, 8 pages copied (one per branch). GPU: 30 layers, 1560-token pages.
"""

import pytest
import torch

from benchmarks.harness import compiled_backends
from kvpo_kernels import copy_pages

SUITE = "copy_pages"


def _shape(device):
    if device.type == "cuda":
        return dict(layers=30, pages=64, tokens=1560)
    return dict(layers=4, pages=64, tokens=390)


def test_copy_pages(recorder, device):
    s = _shape(device)
    pool = torch.randn(s["layers"], s["pages"], 2, s["tokens"], 12, 128, device=device)
    pool = pool.to(torch.bfloat16)
    src = torch.arange(0, 8, dtype=torch.int32, device=device)
    dst = torch.arange(8, 16, dtype=torch.int32, device=device)
    case = f"L={s['layers']} tokens/page={s['tokens']} H=12 D=128 bf16, 8 pages"
    moved = 2 * 8 * pool[0, 0].numel() * pool.element_size() * s["layers"]
    recorder.measure(
        SUITE,
        case,
        "eager index copy",
        lambda: copy_pages(pool, src, dst, backend="torch"),
        device,
        baseline=True,
        bytes_moved=moved,
    )
    for backend in compiled_backends(device):
        row = recorder.measure(
            SUITE,
            case,
            backend,
            lambda b=backend: copy_pages(pool, src, dst, backend=b),
            device,
            bytes_moved=moved,
        )
        row.extra["GB/s"] = round(moved / row.median_ms / 1e6, 1)
    assert torch.equal(pool[:, 8:16], pool[:, 0:8])


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
