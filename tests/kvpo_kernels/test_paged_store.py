"""PagedKVStore against dense references: each sequence's K/V kept as a plain token list."""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpo_kernels import PagedKVStore
from kvpo_kernels.paged import OutOfPages, UnknownSequence
from tests.oracle import BACKENDS

L, S, H, D = 2, 4, 2, 3  # layers, page_size, heads, head_dim
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    assert torch.equal(k.cpu(), k_ref.cpu()) and torch.equal(v.cpu(), v_ref.cpu())


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


def test_fork_shares_pages_and_copy_on_write_protects_the_parent(device):
    store = _store(device=device)
    parent = store.new_sequence()
    k, v = (t.to(device) for t in _tokens(6, 3))  # page 0 full, page 1 half full
    store.append(parent, k, v)
    pool_before = store.pool.clone()
    kids = store.fork(parent, 3)
    assert torch.equal(store.pool.nan_to_num(), pool_before.nan_to_num())  # no bytes moved
    assert store.num_free_pages == 14
    assert [store.refcount(p) for p in (0, 1)] == [4, 4]
    k_new, v_new = (t.to(device) for t in _tokens(3, 4))
    store.append(kids[0], k_new, v_new)  # shared half-full tail: copied before the write
    assert store.pages(kids[0])[0] == 0 and store.pages(kids[0])[1] not in (0, 1)
    assert [store.refcount(p) for p in (0, 1)] == [4, 3]
    assert store.copied_bytes == store.page_bytes  # one page copied, all layers, K and V
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


def test_write_through_the_reservation_places_tokens_by_page_and_offset(device):
    """a (shares a partial tail: copies it), b (empty), c (then the tail's last holder: writes in
    place) get 5 tokens each: the pool equals page/offset arithmetic, NaN where unwritten."""
    store = _store(device=device)
    a, b = store.new_sequence(), store.new_sequence()
    store.append(a, *(t.to(device) for t in _tokens(6, 7)))  # a: page 0 full, page 1 holds 2
    (c,) = store.fork(a, 1)
    expected = store.pool.clone()
    new_k, new_v = (t.to(device).view(L, 3, 5, H, D) for t in _tokens(15, 8))
    reservation = store.reserve([a, b, c], 5)
    pages = {a: [0, 2, 3], b: [4, 5], c: [0, 1, 6]}  # lowest free ids first, a's copy first
    assert {s: store.pages(s) for s in (a, b, c)} == pages
    expected[:, 2] = expected[:, 1]  # the copy-on-write of page 1, every layer
    torch.testing.assert_close(store.pool, expected, rtol=0, atol=0, equal_nan=True)
    placed = []  # (row, token, page, offset)
    for row, (seq, start) in enumerate(((a, 6), (b, 0), (c, 6))):
        for t in range(5):
            placed.append((row, t, pages[seq][(start + t) // S], (start + t) % S))
    slots = [[page * S + offset for r, _, page, offset in placed if r == row] for row in range(3)]
    assert reservation.slots.tolist() == slots and reservation.slots.dtype == torch.int64
    assert reservation.slots.device.type == device.type and reservation.seqs == (a, b, c)
    for layer in (1, 0):  # any layer order; a layer is untouched until written
        store.write(layer, reservation, new_k[layer], new_v[layer])
        for row, t, page, offset in placed:
            expected[layer, page, 0, offset] = new_k[layer, row, t]
            expected[layer, page, 1, offset] = new_v[layer, row, t]
        torch.testing.assert_close(store.pool, expected, rtol=0, atol=0, equal_nan=True)
    assert store.fork(a, 1)  # the reservation closed with the last layer


def test_write_errors_name_what_was_expected_and_what_came():
    store, other = _store(), _store()
    a, b = store.new_sequence(), store.new_sequence()
    res = store.reserve([a, b], 3)
    theirs = other.reserve([other.new_sequence()], 3)
    k, v = (t.view(L, 2, 3, H, D) for t in _tokens(6, 30))
    wrong = [
        (TypeError, r"takes the Reservation returned by reserve\(\), got Tensor \(a tensor: pass",
         lambda: store.write(0, res.slots, k[0], v[0])),
        (ValueError, rf"reservation #{theirs.serial} was made by PagedKVStore #{theirs.store_id}, "
         rf"this is PagedKVStore #{res.store_id}$", lambda: store.write(0, theirs, k[0], v[0])),
        (ValueError, r"k must be \[B=2, T=3, H=2, D=3\] \(the reservation's rows and tokens\), "
         r"got \(2, 2, 2, 3\)", lambda: store.write(0, res, k[0, :, :2], v[0, :, :2])),
        (ValueError, r"v must be \[B=2, .* got \(1, 3, 2, 3\)",
         lambda: store.write(0, res, k[0], v[0, :1])),
        (TypeError, r"v is torch.float64, the store holds torch.float32",
         lambda: store.write(0, res, k[0], v[0].double())),
        (IndexError, r"layer 2 is outside 0..1", lambda: store.write(2, res, k[0], v[0])),
    ]  # fmt: skip
    for error, match, call in wrong:
        with pytest.raises(error, match=match):
            call()
    assert store.pool.isnan().all()  # a rejected write writes nothing
    store.write(0, res, k[0], v[0])
    with pytest.raises(ValueError, match=r"layer 0 of reservation #\d+ was already written; "
                       r"layers still to write: \[1\]"):  # fmt: skip
        store.write(0, res, k[0], v[0])
    store.write(1, res, k[1], v[1])
    with pytest.raises(ValueError, match=rf"reservation #{res.serial} \(sequences \[0, 1\]\) is "
                       "closed: all 2 layers were written"):  # fmt: skip
        store.write(1, res, k[1], v[1])
    _assert_holds(store, a, k[:, 0], v[:, 0])
    _assert_holds(store, b, k[:, 1], v[:, 1])


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


def test_drop_releases_named_pages_and_tracks_the_peak():
    store = _store()
    seq = store.new_sequence()
    k, v = _tokens(24, 14)  # 6 full pages
    store.append(seq, k, v)
    other = store.fork(seq, 1)[0]
    store.append(other, *_tokens(4, 15))  # one private page: 7 pages in use
    assert store.peak_held_bytes == 7 * store.page_bytes
    store.drop(seq, [1, 3, 5])  # holes in the middle, and the full tail page
    assert store.positions(seq) == [0, 2, 4] and store.length(seq) == 12
    kept = torch.cat([k[:, 0:4], k[:, 8:12], k[:, 16:20]], 1)
    _assert_holds(store, seq, kept, torch.cat([v[:, 0:4], v[:, 8:12], v[:, 16:20]], 1))
    store.reset_peak()
    store.free(other)  # pages 1, 3, 5 and the private page had no other holder left
    assert store.num_free_pages == 16 - 3 and store.peak_held_bytes == 7 * store.page_bytes
    store.append(seq, *_tokens(2, 16))  # the next token goes to position 6 (absolute)
    assert store.positions(seq) == [0, 2, 4, 6] and store.copied_bytes == 0
    with pytest.raises(ValueError, match="partially filled tail page"):
        store.drop(seq, [6])
    with pytest.raises(IndexError, match="no page at position 1"):
        store.drop(seq, [1])


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
    reservation = store.reserve([a, b], 4)
    with pytest.raises(RuntimeError, match="cannot fork sequence 0: it has reserved tokens"):
        store.fork(a, 1)
    store.free(b)  # b's page goes back to the pool before its K/V were written
    c = store.new_sequence()
    kc, vc = _tokens(4, 17)
    store.append(c, kc, vc)  # c reuses b's page
    k_new, v_new = torch.randn(L, 2, 4, H, D), torch.randn(L, 2, 4, H, D)
    for layer in range(L):
        store.write(layer, reservation, k_new[layer], v_new[layer])
    _assert_holds(store, c, kc, vc)  # the row of freed b was not written
    _assert_holds(store, a, k_new[:, 0], v_new[:, 0])
    assert store.fork(a, 1)  # the reservation closed


class _Reference:
    """Dense model of one sequence: every token ever appended, and which page positions left."""

    def __init__(self, k=None, v=None, evicted=()):
        self.k = torch.empty(L, 0, H, D, device=DEVICE) if k is None else k
        self.v = torch.empty(L, 0, H, D, device=DEVICE) if v is None else v
        self.evicted = set(evicted)

    def copy(self):
        return _Reference(self.k, self.v, self.evicted)

    def append(self, k, v):
        self.k, self.v = torch.cat([self.k, k], 1), torch.cat([self.v, v], 1)

    def positions(self):
        count = -(-self.k.shape[1] // S)
        return [p for p in range(count) if p not in self.evicted]

    def tokens(self, positions):
        index = [t for p in positions for t in range(p * S, min((p + 1) * S, self.k.shape[1]))]
        return self.k[:, index], self.v[:, index]

    def evict(self, sink, max_pages):
        held = self.positions()
        while len(held) > max_pages:
            older = [p for p in held[:-1] if p >= sink]
            if not older:
                break
            self.evicted.add(older[0])
            held.remove(older[0])


class StoreMachine(RuleBasedStateMachine):
    """Random new/append/reserve+write/fork/free/evict/restore against :class:`_Reference`."""

    def __init__(self):
        super().__init__()
        self.store, self.refs, self.seed = None, {}, 0

    @initialize(backend=st.sampled_from(BACKENDS))
    def make_store(self, backend):
        self.store = _store(num_pages=12, backend=backend, device=DEVICE)

    def _new_tokens(self, *shape):
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        k, v = (torch.randn(L, *shape, H, D, generator=g) for _ in range(2))
        return k.to(DEVICE), v.to(DEVICE)

    def _pool_bits(self):
        return self.store.pool.view(torch.int32).clone()

    def _written_pages_were_private(self, before, writers):
        changed = (self._pool_bits() != before).flatten(2).any(-1).any(0)  # [num_pages]
        for page in changed.nonzero().flatten().tolist():  # free, or held by one writer only
            holders = [s for s in self.store.sequences() if page in self.store.pages(s)]
            assert holders in ([], [w for w in writers if w in holders][:1]), (
                f"page {page} was written while held by {holders} (writers {writers})"
            )

    @rule()
    def new_sequence(self):
        self.refs[self.store.new_sequence()] = _Reference()

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), num_tokens=st.integers(0, 2 * S + 1))
    def append(self, data, num_tokens):
        seq = data.draw(st.sampled_from(sorted(self.refs)))
        k, v = self._new_tokens(num_tokens)
        before, free = self._pool_bits(), self.store.num_free_pages
        try:
            self.store.append(seq, k, v)
        except OutOfPages as err:
            assert f"{free} of 12 are free" in str(err) and self.store.num_free_pages == free
            return
        self.refs[seq].append(k, v)
        self._written_pages_were_private(before, [seq])

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), num_tokens=st.integers(0, S + 2), free_one=st.booleans())
    def reserve_and_write(self, data, num_tokens, free_one):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.refs)), min_size=1, unique=True))
        layers = data.draw(st.permutations(range(L)))
        k, v = self._new_tokens(len(seqs), num_tokens)
        before = self._pool_bits()
        try:
            reservation = self.store.reserve(seqs, num_tokens)
        except OutOfPages:
            return
        if free_one:  # freed before its K/V arrive: its row must not be written
            self.store.free(seqs[0])
            del self.refs[seqs[0]]
        for layer in layers:
            self.store.write(layer, reservation, k[layer], v[layer])
        for row, seq in enumerate(seqs[int(free_one) :], start=int(free_one)):
            self.refs[seq].append(k[:, row], v[:, row])
        self._written_pages_were_private(before, seqs[int(free_one) :])

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data, n):
        seq = data.draw(st.sampled_from(sorted(self.refs)))
        free = self.store.num_free_pages
        for kid in self.store.fork(seq, n):
            self.refs[kid] = self.refs[seq].copy()
        assert self.store.num_free_pages == free  # forking allocates nothing

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.refs)))
        self.store.free(seq)
        del self.refs[seq]

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), sink=st.integers(0, 2), extra=st.integers(1, 3))
    def evict(self, data, sink, extra):
        seq = data.draw(st.sampled_from(sorted(self.refs)))
        victims = self.store.evict(seq, sink, sink + extra)
        before = set(self.refs[seq].evicted)
        self.refs[seq].evict(sink, sink + extra)
        assert victims == sorted(self.refs[seq].evicted - before)

    @precondition(lambda self: len(self.refs) >= 2)
    @rule(data=st.data())
    def restore(self, data):
        seq, snap = data.draw(st.permutations(sorted(self.refs)))[:2]
        self.store.restore(seq, snap)
        self.refs[seq] = self.refs[snap].copy()

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def page_table_with_select(self, data):
        seq = data.draw(st.sampled_from(sorted(self.refs)))
        ref = self.refs[seq]
        held = ref.positions()
        chosen = data.draw(st.permutations(held))[: data.draw(st.integers(0, len(held)))]
        if held and ref.k.shape[1] % S and held[-1] in chosen:  # a partial tail goes last
            chosen = [p for p in chosen if p != held[-1]] + [held[-1]]
        table, lens = self.store.page_table([seq], select=[chosen])
        k_ref, v_ref = ref.tokens(chosen)
        assert lens.tolist() == [k_ref.shape[1]]
        layer = self.store.kv_pages(L - 1)  # read through the table like attention does
        rows = layer[table[0, : len(chosen)].long()]
        k_got = rows[:, 0].reshape(-1, H, D)[: k_ref.shape[1]]
        v_got = rows[:, 1].reshape(-1, H, D)[: k_ref.shape[1]]
        assert torch.equal(k_got, k_ref[L - 1]) and torch.equal(v_got, v_ref[L - 1])

    @invariant()
    def matches_reference(self):
        if self.store is None:
            return
        holders = {}
        for seq, ref in self.refs.items():
            k_ref, v_ref = ref.tokens(ref.positions())
            _assert_holds(self.store, seq, k_ref, v_ref)
            assert self.store.positions(seq) == ref.positions()
            for page in self.store.pages(seq):
                holders[page] = holders.get(page, 0) + 1
        for page in range(self.store.num_pages):
            assert self.store.refcount(page) == holders.get(page, 0), f"page {page}"
        assert self.store.num_free_pages == self.store.num_pages - len(holders)

    def teardown(self):
        if self.store is None:
            return
        for seq in list(self.refs):
            self.store.free(seq)
        assert self.store.num_free_pages == self.store.num_pages
        assert self.store.sequences() == []


StoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, derandomize=True
)
test_store_against_dense_reference = StoreMachine.TestCase
