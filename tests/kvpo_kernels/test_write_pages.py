"""write_pages on every backend against an oracle written as a Python loop over tokens."""

import pytest
import torch

import kvpo_kernels
from kvpo_kernels.ops.write_pages import _write_pages_op
from tests.oracle import BACKENDS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _oracle(kv_pages, k, v, slots):
    out = kv_pages.clone()
    page_size = kv_pages.shape[2]
    for n, slot in enumerate(slots.reshape(-1).tolist()):
        out[slot // page_size, 0, slot % page_size] = k.reshape(-1, *k.shape[-2:])[n]
        out[slot // page_size, 1, slot % page_size] = v.reshape(-1, *v.shape[-2:])[n]
    return out


def _assert_same(out, expected):
    """Bitwise equal, NaNs in the same places."""
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(out.nan_to_num(0.0), expected.nan_to_num(0.0))


def _pool(num_pages=6, page_size=5, heads=3, dim=7, dtype=torch.float32, device="cpu"):
    shape = (num_pages, 2, page_size, heads, dim)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_pages_matches_oracle(backend, dtype, device):
    pages = _pool(dtype=dtype, device=device)  # NaN poison: untouched slots must stay NaN
    slots = torch.tensor([29, 0, 12, 13, 14, 15, 4], device=device)  # crosses pages 2 -> 3
    k = torch.randn(7, 3, 7).to(dtype).to(device)
    v = torch.randn(7, 3, 7).to(dtype).to(device)
    expected = _oracle(pages, k, v, slots)
    kvpo_kernels.write_pages(pages, k, v, slots, backend=backend)
    _assert_same(pages, expected)
    written = torch.zeros(6 * 5, dtype=torch.bool, device=device)
    written[slots] = True
    untouched = pages.transpose(0, 1).reshape(2, 30, 3, 7)[:, ~written]
    assert torch.isnan(untouched).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_pages_batched_rows_into_a_layer_view(backend, device):
    pool = torch.zeros(3, 4, 2, 6, 2, 8, device=device)  # [L, P, 2, page_size, H, D]
    before = pool.clone()
    slots = torch.tensor([[6, 7, 8], [20, 21, 22]], device=device)  # [B=2, T=3]
    k = torch.randn(2, 3, 2, 8, device=device)
    v = torch.randn(2, 3, 2, 8, device=device)
    kvpo_kernels.write_pages(pool[1], k, v, slots, backend=backend)
    assert torch.equal(pool[1], _oracle(before[1], k, v, slots))
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[2], before[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_pages_non_contiguous_inputs_and_empty(backend, device):
    pages = _pool(device=device)
    v = torch.randn(2, 4, 3, 7, device=device)[1]  # a view at an offset
    k_t = torch.randn(3, 4, 7, device=device).transpose(0, 1)  # [4, 3, 7], rows not contiguous
    slots = torch.tensor([3, 9, 10, 25], device=device)
    expected = _oracle(pages, k_t, v, slots)
    kvpo_kernels.write_pages(pages, k_t, v, slots, backend=backend)
    _assert_same(pages, expected)
    empty = torch.empty(0, 3, 7, device=device)
    kvpo_kernels.write_pages(pages, empty, empty, torch.empty(0, dtype=torch.int64, device=device))
    _assert_same(pages, expected)


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(slots=[0, 30]), IndexError, r"slots\[1\] names 30, the pool has 30 slots"),
        (dict(slots=[-1, 2]), IndexError, r"slots\[0\] names -1"),
        (dict(slots=[4, 4]), ValueError, r"slots name a slot more than once: \[4\]"),
        (dict(slot_dtype=torch.int32), TypeError, "slots must be int64, got torch.int32"),
        (dict(kv_dtype=torch.float16), TypeError, "k is torch.float16, the pool is torch.float32"),
        (dict(heads=2), ValueError, r"k must be \[..., H=3, D=7\] like the pool, got \(2, 2, 7\)"),
        (
            dict(slots=[1, 2, 3]),
            ValueError,
            r"slots must have k's leading shape \(2,\), got \(3,\)",
        ),
    ],
)
def test_write_pages_rejects_bad_input(change, err, match):
    pages = _pool()
    k = torch.randn(2, change.get("heads", 3), 7).to(change.get("kv_dtype", torch.float32))
    slots = torch.tensor(change.get("slots", [0, 1]), dtype=change.get("slot_dtype", torch.int64))
    with pytest.raises(err, match=match):
        kvpo_kernels.write_pages(pages, k, k.clone(), slots)


def test_write_pages_rejects_bad_pool_and_mismatched_v():
    k = torch.randn(2, 3, 7)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"kv_pages must be \[P, 2, page_size, H, D\]"):
        kvpo_kernels.write_pages(torch.zeros(6, 3, 5, 3, 7), k, k, slots)
    with pytest.raises(ValueError, match=r"k has shape \(2, 3, 7\), v has \(1, 3, 7\)"):
        kvpo_kernels.write_pages(_pool(), k, k[:1], slots)


@pytest.mark.parametrize("backend", ("torch", "cpp"))
def test_write_pages_opcheck_and_compile(backend):
    pages = torch.randn(4, 2, 3, 2, 4)
    k, v = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)
    slots = torch.tensor([[0, 1], [7, 8]], dtype=torch.int64)
    torch.library.opcheck(_write_pages_op, (pages, k, v, slots, backend))

    @torch.compile(backend="eager", fullgraph=True)
    def step(p):
        kvpo_kernels.write_pages(p, k, v, slots, backend=backend)
        return p * 2

    expected = _oracle(pages, k, v, slots) * 2
    assert torch.equal(step(pages.clone()), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_ops_address_past_2_gib(backend, device):
    # 600k pages of 4 KiB: the last pages start past 2^31 bytes. torch.empty only reserves
    # address space; the few pages touched here are all that gets committed.
    num_pages, page_size, dim = 600_000, 16, 64
    try:
        pool = torch.empty(1, num_pages, 2, page_size, 1, dim, dtype=torch.float16, device=device)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        pytest.skip(f"cannot reserve a 2.5 GB pool here: {err}")
    assert pool[0, -1].data_ptr() - pool.data_ptr() > 2**31
    pages = pool[0]
    pages[:3].fill_(float("nan"))
    pages[-3:].fill_(float("nan"))
    last, first = num_pages - 1, 0
    slots = torch.tensor([last * page_size + 13, first * page_size + 2], device=device)
    k = torch.randn(2, 1, dim, device=device).half()
    v = torch.randn(2, 1, dim, device=device).half()
    kvpo_kernels.write_pages(pages, k, v, slots, backend=backend)
    assert torch.equal(pages[last, 0, 13], k[0]) and torch.equal(pages[last, 1, 13], v[0])
    assert torch.equal(pages[first, 0, 2], k[1]) and torch.equal(pages[first, 1, 2], v[1])
    assert torch.isnan(pages[last, :, :13]).all() and torch.isnan(pages[last - 1]).all()
    src = torch.tensor([last], dtype=torch.int32, device=device)
    dst = torch.tensor([1], dtype=torch.int32, device=device)
    kvpo_kernels.copy_pages(pool, src, dst, backend=backend)  # copy-on-write across 2 GiB
    assert torch.equal(pages[1, 0, 13], k[0]) and torch.isnan(pages[1, :, :13]).all()


@pytest.mark.parametrize("backend", ("triton", "cpp"))
def test_write_pages_slot_ids_past_2_pow_31(backend, device):
    # 2^22 pages of 1024 tokens = 2^32 slots; page stride 0 aliases every page onto one small
    # buffer, so slot ids past int32 are exercised without the memory (torch's own indexing
    # refuses to write through overlapping views, so the eager backend is left out).
    base = torch.full((2 * 1024,), float("nan"), device=device)
    pages = base.as_strided((2**22, 2, 1024, 1, 1), (0, 1024, 1, 1, 1))
    slot = 2**32 - 5  # page 2^22 - 1, offset 1019
    k, v = torch.tensor([[[1.5]]], device=device), torch.tensor([[[-2.5]]], device=device)
    kvpo_kernels.write_pages(pages, k, v, torch.tensor([slot], device=device), backend=backend)
    assert base[1019].item() == 1.5 and base[1024 + 1019].item() == -2.5
    assert torch.isnan(base).sum() == 2 * 1024 - 2
