"""Page tables: PageTableBuilder and PagedKVStore.page_table against plain Python lists, and the
lifetime rule (a table is never overwritten by a later build)."""

import random

import pytest
import torch

from kvpo_kernels import PagedKVStore, routed_attention
from kvpo_kernels.paged import PageTableBuilder

L, S, H, D = 2, 4, 2, 3  # layers, page_size, heads, head_dim


def _padded(rows):
    """The reference table: rows padded with page 0 to the longest row (at least 1 wide)."""
    width = max([1] + [len(row) for row in rows])
    return [list(row) + [0] * (width - len(row)) for row in rows]


def _store_with_tokens(tokens, seed):
    store = PagedKVStore(L, 16, S, H, D)
    store.pool.fill_(float("nan"))
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(L, tokens, H, D, generator=g) for _ in range(2))
    seq = store.new_sequence()
    store.append(seq, k, v)
    return store, seq, k, v


def test_builder_matches_python_lists(device):
    rng = random.Random(0)
    builder = PageTableBuilder(device, max_rows=2, max_pages=2)
    for _ in range(30):
        rows = [
            [rng.randrange(2**31) for _ in range(rng.randint(0, 9))]
            for _ in range(rng.randint(0, 6))
        ]
        lens = [rng.randrange(2**31) for _ in rows]
        table, ctx_lens = builder.build(rows, lens)
        assert table.dtype == torch.int32 and ctx_lens.dtype == torch.int32
        assert table.device.type == ctx_lens.device.type == device.type
        assert table.is_contiguous() and ctx_lens.is_contiguous()
        assert table.shape == (len(rows), max([1] + [len(r) for r in rows]))
        assert table.tolist() == _padded(rows) and ctx_lens.tolist() == lens


def test_staging_grows_and_later_smaller_tables_are_padded_with_zeros():
    builder = PageTableBuilder("cpu", max_rows=1, max_pages=1)
    assert builder.capacity == 2  # one row of one page plus its length
    big = [[7 + i] * 9 for i in range(5)]
    table, lens = builder.build(big, [36] * 5)
    assert builder.capacity >= 5 * 9 + 5 and table.tolist() == big and lens.tolist() == [36] * 5
    grown = builder.capacity
    table, lens = builder.build([[3], [], [4, 5]], [4, 0, 8])  # in the big table's cells
    assert table.tolist() == [[3, 0], [0, 0], [4, 5]] and lens.tolist() == [4, 0, 8]
    assert builder.capacity == grown and builder.num_staging == 1
    table, lens = builder.build([], [])
    assert table.shape == (0, 1) and lens.shape == (0,)
    with pytest.raises(ValueError, match="ctx_lens has 1 entries for 2 rows"):
        builder.build([[1], [2]], [4])
    with pytest.raises(OverflowError):
        builder.build([[2**31]], [4])  # page ids are int32


def test_a_table_outlives_later_builds(device):
    builder = PageTableBuilder(device)
    kept = [builder.build([[1, 2, 3], [4 + i]], [12, 4 + i]) for i in range(4)]
    later = builder.build([[9, 8, 7], [6]], [9, 1])  # same shape: the same staging cells
    for i, (table, lens) in enumerate(kept):
        assert table.tolist() == [[1, 2, 3], [4 + i, 0, 0]] and lens.tolist() == [12, 4 + i]
    pointers = {t.data_ptr() for pair in [*kept, later] for t in pair}
    assert len(pointers) == 2 * len(kept) + 2  # no two results share memory


def test_attention_saved_for_backward_keeps_its_table():
    """Routed attention saves the page table for its backward; building another table before
    the backward must leave the gradients equal to those of an independent table."""
    pool = torch.randn(6, 2, S, H, D, dtype=torch.float64)
    q, k_new, v_new = (torch.randn(2, 3, H, D, dtype=torch.float64) for _ in range(3))
    rows, lens = [[0, 1], [2]], [7, 4]

    def grads(table, ctx_lens, between=lambda: None):
        inputs = [t.clone().requires_grad_() for t in (q, k_new, v_new)]
        out = routed_attention(*inputs, pool, table, ctx_lens, backend="torch")
        between()
        (out * out).sum().backward()
        return [t.grad for t in inputs]

    builder = PageTableBuilder("cpu")
    table, ctx_lens = builder.build(rows, lens)
    got = grads(table, ctx_lens, lambda: builder.build([[5, 4], [3]], [8, 3]))
    expected = grads(torch.tensor(_padded(rows), dtype=torch.int32), torch.tensor(lens).int())
    other = grads(*builder.build([[5, 4], [3]], [8, 3]))
    assert not torch.equal(other[0], expected[0])  # the other table would show
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_store_page_table_default_and_select():
    store, a, k, v = _store_with_tokens(14, 9)  # positions 0..3, tail (3) holds 2 tokens
    b = store.fork(a, 1)[0]
    g = torch.Generator().manual_seed(10)
    store.append(b, *(torch.randn(L, 2, H, D, generator=g) for _ in range(2)))  # b: tail copied
    table, lens = store.page_table([a, b])
    assert table.dtype == torch.int32 and lens.dtype == torch.int32
    assert table.tolist() == [[0, 1, 2, 3], [0, 1, 2, 4]] and lens.tolist() == [14, 16]
    first = table.clone()
    table, lens = store.page_table([a, b], select=[[0, 2, 3], [3, 1]])
    assert table.tolist() == [[0, 2, 3], [4, 1, 0]] and lens.tolist() == [4 + 4 + 2, 8]
    pool = store.kv_pages(1)  # the named pages hold the selected tokens, in select order
    got = pool[table[0].long(), 0].reshape(12, H, D)[:10]
    assert torch.equal(got, torch.cat([k[1, 0:4], k[1, 8:14]]))
    _, v_b = store.gather(b)
    got_b = pool[table[1, :2].long(), 1].reshape(8, H, D)
    assert torch.equal(got_b, torch.cat([v_b[1, 12:16], v_b[1, 4:8]]))
    empty_table, empty_lens = store.page_table([store.new_sequence()])
    assert empty_table.shape == (1, 1) and empty_lens.tolist() == [0]
    assert first.tolist() == [[0, 1, 2, 3], [0, 1, 2, 4]]


def test_store_page_table_select_errors_and_evicted_positions():
    store, seq, _, _ = _store_with_tokens(21, 11)  # 6 positions, tail (5) holds 1 token
    assert store.evict(seq, keep_sink_pages=1, max_pages=4) == [1, 2]
    table, lens = store.page_table([seq], select=[[0, 5]])
    assert table.tolist() == [[0, 5]] and lens.tolist() == [4 + 1]
    wrong = [
        (IndexError, r"select\[0\]\[1\] = 2: that page of sequence 0 was evicted", [[0, 2]]),
        (IndexError, r"select\[0\]\[1\] = 6: sequence 0 has page positions 0..5", [[0, 6]]),
        (ValueError, r"partial tail page \(position 5, 1 of 4 tokens\) at index 0 of 2", [[5, 0]]),
        (ValueError, "select\\[0\\] names a position more than once", [[0, 0]]),
        (ValueError, "select has 2 entries for 1 sequences", [[0], [0]]),
    ]
    for error, match, select in wrong:
        with pytest.raises(error, match=match):
            store.page_table([seq], select=select)


def test_frame_cache_views_keep_their_tables():
    """Replay pins a view per block and runs their backwards after building later views."""
    from kvpo.models import CachePolicy, FrameCache

    store = PagedKVStore(L, 16, S, H, D)
    policy = CachePolicy(sink_size=0, local_attn_size=-1, resident_frames=-1, frames_per_block=3)
    cache = FrameCache(store, policy, backend="torch")
    rows = cache.new_rows(2)
    write = cache.view(rows, 0, 3, write=True)
    k = torch.randn(2, 3 * S, H, D)
    for layer in range(L):
        for reservation, lo, hi in write.reservations:
            store.write(layer, reservation, k[:, lo:hi], k[:, lo:hi])
    frame_pages = [store.pages(seq) for seq in store.sequences()]  # one segment per row
    plans = [[[0, 2], [1]], [[2, 1], [0, 1]], [[1], [2, 0]]]
    views = [cache.view(rows, 3, 3, plans=plan) for plan in plans]
    for view, plan in zip(views, plans):
        pages = [[frame_pages[row][f] for f in frames] for row, frames in enumerate(plan)]
        assert view.page_table.tolist() == _padded(pages)
        assert view.ctx_lens.tolist() == [len(frames) * S for frames in plan]
