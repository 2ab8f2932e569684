"""PagedKVStore against dense references: each sequence's K/V kept as a plain token list."""

import pytest
import torch

from kvpo_kernels import PagedKVStore
from kvpo_kernels.paged import OutOfPages, UnknownSequence

L, S, H, D = 2, 4, 2, 3  # layers, page_size, heads, head_dim


def _store(num_pages=16, **kw):
    store = PagedKVStore(L, num_pages, S, H, D, **kw)
    store.pool.fill_(float("nan"))  # poison: nothing may read a slot before it is written
    return store


def _tokens(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, t, H, D, generator=g), torch.randn(L, t, H, D, generator=g)


def _assert_holds(store, seq, k_ref, v_ref):
    k, v = store.gather(seq)
    assert store.length(seq) == k_ref.shape[1]
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_append_fills_tail_then_new_pages():
    store = _store()
    seq = store.new_sequence()
    k1, v1 = _tokens(3, 1)
    k2, v2 = _tokens(7, 2)
    store.append(seq, k1, v1)
    assert store.pages(seq) == [0] and store.num_free_pages == 15
    store.append(seq, k2, v2)  # 1 token fills page 0, then 4 + 2 tokens on two new pages
    assert store.pages(seq) == [0, 1, 2] and store.total_length(seq) == 10
    _assert_holds(store, seq, torch.cat([k1, k2], 1), torch.cat([v1, v2], 1))
    # the pool holds the tokens at page_id * page_size + offset, K at index 0, V at 1
    assert torch.equal(store.kv_pages(1)[2, 0, :2], k2[1, 5:])
    assert torch.equal(store.kv_pages(0)[1, 1], v2[0, 1:5])
    assert store.kv_pages(1).data_ptr() == store.pool[1].data_ptr()


def test_fork_shares_pages_and_copy_on_write_protects_the_parent():
    store = _store()
    parent = store.new_sequence()
    k, v = _tokens(6, 3)  # page 0 full, page 1 half full
    store.append(parent, k, v)
    pool_before = store.pool.clone()
    kids = store.fork(parent, 3)
    assert torch.equal(store.pool.nan_to_num(), pool_before.nan_to_num())  # no bytes moved
    assert store.num_free_pages == 14
    assert [store.refcount(p) for p in (0, 1)] == [4, 4]
    k_new, v_new = _tokens(3, 4)
    store.append(kids[0], k_new, v_new)  # shared half-full tail: copied before the write
    assert store.pages(kids[0])[0] == 0 and store.pages(kids[0])[1] not in (0, 1)
    assert [store.refcount(p) for p in (0, 1)] == [4, 3]
    _assert_holds(store, parent, k, v)
    _assert_holds(store, kids[1], k, v)
    _assert_holds(store, kids[0], torch.cat([k, k_new], 1), torch.cat([v, v_new], 1))


def test_full_shared_tail_is_not_copied():
    store = _store()
    parent = store.new_sequence()
    store.append(parent, *_tokens(8, 5))
    kid = store.fork(parent, 1)[0]
    free = store.num_free_pages
    store.append(kid, *_tokens(1, 6))
    assert store.num_free_pages == free - 1  # one new page, no copy
    assert store.pages(kid)[:2] == store.pages(parent)


def test_reserve_and_write_layer_by_layer_for_a_batch():
    store = _store()
    a, b = store.new_sequence(), store.new_sequence()
    ka, va = _tokens(2, 7)
    store.append(a, ka, va)
    (c,) = store.fork(a, 1)
    new_k = torch.randn(L, 3, 5, H, D)
    new_v = torch.randn(L, 3, 5, H, D)
    slots = store.reserve([a, b, c], 5)  # a batch of rows, 5 new tokens each
    assert slots.dtype == torch.int64 and slots.shape == (3, 5)
    assert store.refcount(store.pages(a)[0]) == 1  # a's tail was copied: a and c diverge
    for layer in range(L):
        store.write(layer, slots, new_k[layer], new_v[layer])
    _assert_holds(store, a, torch.cat([ka, new_k[:, 0]], 1), torch.cat([va, new_v[:, 0]], 1))
    _assert_holds(store, b, new_k[:, 1], new_v[:, 1])
    _assert_holds(store, c, torch.cat([ka, new_k[:, 2]], 1), torch.cat([va, new_v[:, 2]], 1))
    with pytest.raises(ValueError, match="slots must be the tensor returned by reserve"):
        store.write(0, slots, new_k[0], new_v[0])  # the reservation closed after every layer


def test_page_table_default_and_select():
    store = _store()
    a = store.new_sequence()
    k, v = _tokens(14, 9)  # positions 0..3, tail (position 3) holds 2 tokens
    store.append(a, k, v)
    b = store.fork(a, 1)[0]
    store.append(b, *_tokens(2, 10))  # b: tail copied, now full (16 tokens)
    table, lens = store.page_table([a, b])
    assert table.dtype == torch.int32 and lens.dtype == torch.int32
    assert table.tolist() == [store.pages(a), store.pages(b)] and lens.tolist() == [14, 16]
    table, lens = store.page_table([a, b], select=[[0, 2, 3], [3, 1]])
    assert lens.tolist() == [4 + 4 + 2, 8]
    # the table names pages whose slots hold the selected tokens, in select order
    pool = store.kv_pages(1)
    got = pool[table[0].long(), 0].reshape(12, H, D)[:10]
    assert torch.equal(got, torch.cat([k[1, 0:4], k[1, 8:14]]))
    got_b = pool[table[1, :2].long(), 1].reshape(8, H, D)
    _, v_b = store.gather(b)
    assert torch.equal(got_b, torch.cat([v_b[1, 12:16], v_b[1, 4:8]]))
    empty_table, empty_lens = store.page_table([store.new_sequence()])
    assert empty_table.shape == (1, 1) and empty_lens.tolist() == [0]


def test_evict_drops_oldest_non_sink_pages_without_copying():
    store = _store()
    seq = store.new_sequence()
    k, v = _tokens(22, 11)  # 6 positions, tail holds 2 tokens
    store.append(seq, k, v)
    keep = store.fork(seq, 1)[0]  # holds every page: evicted pages stay allocated for it
    pages = store.pages(seq)
    assert store.evict(seq, keep_sink_pages=1, max_pages=4) == [1, 2]
    assert store.positions(seq) == [0, 3, 4, 5] and store.total_length(seq) == 22
    assert [store.refcount(p) for p in pages] == [2, 1, 1, 2, 2, 2]
    kept = torch.cat([k[:, 0:4], k[:, 12:22]], 1), torch.cat([v[:, 0:4], v[:, 12:22]], 1)
    _assert_holds(store, seq, *kept)
    _assert_holds(store, keep, k, v)
    store.free(keep)
    assert store.num_free_pages == 16 - 4
    store.append(seq, *_tokens(2, 12))
    assert store.positions(seq) == [0, 3, 4, 5]  # the tail filled up, absolute positions kept
    _, lens = store.page_table([seq], select=[[0, 5]])
    assert lens.tolist() == [8]
    with pytest.raises(IndexError, match=r"select\[0\]\[1\] = 2: that page of sequence 0 was"):
        store.page_table([seq], select=[[0, 2]])


def test_snapshot_restore_and_free_everything():
    store = _store()
    seq = store.new_sequence()
    k, v = _tokens(5, 13)
    store.append(seq, k, v)
    snap = store.snapshot(seq)
    for branch in range(3):
        store.append(seq, *_tokens(6, 20 + branch))
        store.restore(seq, snap)
        _assert_holds(store, seq, k, v)
    assert store.num_free_pages == 14
    store.free(snap)
    store.free(seq)
    assert store.num_free_pages == 16 and store.sequences() == []
    assert all(store.refcount(p) == 0 for p in range(16))


def test_errors_name_the_values():
    store = _store(num_pages=3)
    seq = store.new_sequence()
    with pytest.raises(OutOfPages, match=r"reserving 13 tokens for 1 sequences needs 4 pages "):
        store.append(seq, *_tokens(13, 14))
    assert store.num_free_pages == 3 and store.length(seq) == 0  # nothing half-done
    with pytest.raises(OutOfPages, match=r"3 of 3 are free"):
        store.reserve([seq], 13)
    store.append(seq, *_tokens(5, 15))
    with pytest.raises(IndexError, match=r"select\[0\]\[1\] = 2: sequence 0 has page positions"):
        store.page_table([seq], select=[[0, 2]])
    with pytest.raises(ValueError, match=r"partial tail page \(position 1, 1 of 4 tokens\)"):
        store.page_table([seq], select=[[1, 0]])
    with pytest.raises(ValueError, match="names a position more than once"):
        store.page_table([seq], select=[[0, 0]])
    k, v = _tokens(2, 16)
    with pytest.raises(ValueError, match=r"k must be \[num_layers=2, T, H=2, D=3\]"):
        store.append(seq, k[:1], v[:1])
    with pytest.raises(TypeError, match="k is torch.float64, the store holds torch.float32"):
        store.append(seq, k.double(), v.double())
    with pytest.raises(ValueError, match=r"v must be .* got \(2, 1, 2, 3\)"):
        store.append(seq, k, v[:, :1])
    store.free(seq)
    with pytest.raises(UnknownSequence, match="sequence 0 was freed"):
        store.length(seq)
    with pytest.raises(UnknownSequence, match="unknown sequence 7: this store has made sequences"):
        store.fork(7, 1)
    with pytest.raises(IndexError, match=r"page id 3 is outside the pool of 3 pages"):
        store.refcount(3)


def test_unwritten_reservations_block_sharing_and_never_hit_freed_pages():
    store = _store(num_pages=4)
    a, b = store.new_sequence(), store.new_sequence()
    slots = store.reserve([a, b], 4)
    with pytest.raises(RuntimeError, match="cannot fork sequence 0: it has reserved tokens"):
        store.fork(a, 1)
    store.free(b)  # b's page goes back to the pool before its K/V were written
    c = store.new_sequence()
    kc, vc = _tokens(4, 17)
    store.append(c, kc, vc)  # c reuses b's page
    k_new, v_new = torch.randn(L, 2, 4, H, D), torch.randn(L, 2, 4, H, D)
    for layer in range(L):
        store.write(layer, slots, k_new[layer], v_new[layer])
    _assert_holds(store, c, kc, vc)  # the row of freed b was not written
    _assert_holds(store, a, k_new[:, 0], v_new[:, 0])
    assert store.fork(a, 1)  # the reservation closed
