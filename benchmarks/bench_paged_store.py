"""Branching a KV cache: G = 8 branches fork N frames of history and each append M frames.

Providers, measured in the same run:
- ``clone per branch`` (baseline, the reference implementation's approach): every branch gets a
  dense copy of the history per layer with its new frames concatenated; all branches held at once.
- ``snapshot/restore via host``: one working cache; the history is snapshotted to host memory
  and restored into the working cache before each branch writes its frames (branches run one
  after the other, so only one is held at a time).
- ``paged store``: ``PagedKVStore.fork`` (page-table copies), one ``reserve`` for all branches
  and one ``write`` per layer through the reservation it returned; all branches held at once.

``held MiB`` = K/V bytes resident when the branches exist (history included; host snapshot
included for snapshot/restore); ``held_reduction`` = clone's held bytes / the provider's.
A second suite, ``write_pages``, times the scatter op itself per backend against eager indexing.

Shapes: pages of one latent frame, Wan-shaped rows (12 heads x 128, bf16). CPU: 2 layers and 390
tokens per frame (a 1560-token Wan frame cut by 4), 4.8 MB per frame. GPU: 10 layers, 1560
tokens, 96 MB per frame. M = 3 frames (one block); N = 6 and 24.
"""

import pytest
import torch

from benchmarks.harness import compiled_backends
from kvpo_kernels import PagedKVStore, write_pages

SUITE = "paged_store"
G, M = 8, 3


def _shape(device):
    if device.type == "cuda":
        return dict(layers=10, tokens=1560, heads=12, dim=128)
    return dict(layers=2, tokens=390, heads=12, dim=128)


def _frames(s, n, device, batch=()):
    """K and V of ``n`` frames: two ``[L, *batch, n * tokens, H, D]`` bf16 tensors."""
    shape = (s["layers"], *batch, n * s["tokens"], s["heads"], s["dim"])
    return (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(2))


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _clone_per_branch(hist_k, hist_v, new_k, new_v):
    """Per layer and branch, history ++ the branch's new frames; returns every branch's cache."""
    return [
        [
            (torch.cat([hist_k[l], new_k[l, g]]), torch.cat([hist_v[l], new_v[l, g]]))
            for l in range(len(hist_k))
        ]
        for g in range(new_k.shape[1])
    ]


def _snapshot_restore(work_k, work_v, history_tokens, new_k, new_v, host):
    """Snapshot the history to ``host``, then per branch restore it and write the new frames."""
    snap_k = work_k[:, :history_tokens].to(host, copy=True)
    snap_v = work_v[:, :history_tokens].to(host, copy=True)
    for g in range(new_k.shape[1]):
        work_k[:, :history_tokens].copy_(snap_k)
        work_v[:, :history_tokens].copy_(snap_v)
        work_k[:, history_tokens:].copy_(new_k[:, g])
        work_v[:, history_tokens:].copy_(new_v[:, g])
    return snap_k, snap_v


def _paged_branches(store, history, new_k, new_v):
    """Fork ``history`` into the branches and write their frames; returns the branch handles."""
    kids = store.fork(history, new_k.shape[1])
    reservation = store.reserve(kids, new_k.shape[2])
    for layer in range(store.num_layers):
        store.write(layer, reservation, new_k[layer], new_v[layer])
    return kids


def _free_all(store, seqs):
    for seq in seqs:
        store.free(seq)


@pytest.mark.parametrize("history_frames", [6, 24])
def test_branching(recorder, device, history_frames):
    s, n = _shape(device), history_frames
    case = (
        f"G={G} N={n} M={M} frames, L={s['layers']} tokens/frame={s['tokens']} "
        f"H={s['heads']} D={s['dim']} bf16"
    )
    hist_k, hist_v = _frames(s, n, device)
    new_k, new_v = _frames(s, M, device, batch=(G,))

    def clone():
        return _clone_per_branch(hist_k, hist_v, new_k, new_v)

    held_clone = _nbytes(hist_k, hist_v) + _nbytes(*[t for b in clone() for kv in b for t in kv])
    recorder.measure(
        SUITE, case, "clone per branch", clone, device, baseline=True, held_bytes=held_clone
    )

    host = torch.device("cpu")
    work_k = torch.cat([hist_k, torch.empty_like(new_k[:, 0])], 1)
    work_v = torch.cat([hist_v, torch.empty_like(new_v[:, 0])], 1)
    history_tokens = hist_k.shape[1]

    def snapshot_restore():
        return _snapshot_restore(work_k, work_v, history_tokens, new_k, new_v, host)

    held_snap = _nbytes(work_k, work_v, *snapshot_restore())
    row = recorder.measure(
        SUITE, case, "snapshot/restore via host", snapshot_restore, device, held_bytes=held_snap
    )
    row.extra["held_reduction"] = f"{held_clone / held_snap:.2f}x"

    store = PagedKVStore(
        s["layers"],
        n + G * M + 1,
        s["tokens"],
        s["heads"],
        s["dim"],
        dtype=torch.bfloat16,
        device=device,
    )
    history = store.new_sequence()
    store.append(history, hist_k, hist_v)
    kids = _paged_branches(store, history, new_k, new_v)
    held_paged = store.held_bytes
    for g, kid in enumerate(kids):  # the branches hold what the baseline's clones hold
        k, v = store.gather(kid)
        assert torch.equal(k, torch.cat([hist_k, new_k[:, g]], 1))
        assert torch.equal(v, torch.cat([hist_v, new_v[:, g]], 1))
    _free_all(store, kids)
    row = recorder.measure(
        SUITE,
        case,
        "paged store (fork + reserve + write)",
        lambda: _free_all(store, _paged_branches(store, history, new_k, new_v)),
        device,
        held_bytes=held_paged,
    )
    row.extra["held_reduction"] = f"{held_clone / held_paged:.2f}x"
    row.extra["pool_MiB"] = round(_nbytes(store.pool) / 2**20, 1)


@pytest.mark.parametrize("history_frames", [6, 24, 96])
def test_fork_time_is_independent_of_history(recorder, device, history_frames):
    """Forking alone: G page-table copies versus G dense copies of the history."""
    s, n = _shape(device), history_frames
    case = f"fork only: G={G} N={n} frames, L={s['layers']} tokens/frame={s['tokens']} bf16"
    store = PagedKVStore(
        s["layers"], n, s["tokens"], s["heads"], s["dim"], dtype=torch.bfloat16, device=device
    )
    history = store.new_sequence()
    zeros = torch.zeros(
        1, n * s["tokens"], s["heads"], s["dim"], dtype=torch.bfloat16, device=device
    )
    reservation = store.reserve([history], zeros.shape[1])
    for layer in range(s["layers"]):
        store.write(layer, reservation, zeros, zeros)
    del zeros
    if n <= 24:  # the dense copies of N = 96 would not fit next to the rest on the CPU
        pool = store.pool[:, :n]
        recorder.measure(
            SUITE,
            case,
            "clone history per branch",
            lambda: [pool.clone() for _ in range(G)],
            device,
            baseline=True,
        )
    recorder.measure(
        SUITE,
        case,
        "paged fork + free",
        lambda: _free_all(store, store.fork(history, G)),
        device,
        memory=False,
    )


def test_write_pages(recorder, device):
    s = _shape(device)
    pages = torch.zeros(
        G * M + 4, 2, s["tokens"], s["heads"], s["dim"], device=device, dtype=torch.bfloat16
    )
    k, v = (t[0] for t in _frames(s, M, device, batch=(G,)))  # one layer: [G, M * tokens, H, D]
    perm = torch.randperm(pages.shape[0] * s["tokens"], device=device)[: G * M * s["tokens"]]
    slots = perm.view(G, M * s["tokens"])
    moved = 2 * 2 * _nbytes(k)  # K and V read once and written once
    case = f"G={G} rows x {M * s['tokens']} tokens, H={s['heads']} D={s['dim']} bf16, one layer"
    recorder.measure(
        "write_pages",
        case,
        "eager index_put",
        lambda: write_pages(pages, k, v, slots, backend="torch"),
        device,
        baseline=True,
        bytes_moved=moved,
    )
    for backend in compiled_backends(device):
        row = recorder.measure(
            "write_pages",
            case,
            backend,
            lambda b=backend: write_pages(pages, k, v, slots, backend=b),
            device,
            bytes_moved=moved,
        )
        row.extra["GB/s"] = round(moved / row.median_ms / 1e6, 1)
    page, offset = slots // s["tokens"], slots % s["tokens"]
    assert torch.equal(pages[page, 0, offset], k) and torch.equal(pages[page, 1, offset], v)


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
