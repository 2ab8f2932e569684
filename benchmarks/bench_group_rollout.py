"""Group rollout with the causal Wan model: G = 8 routed branches + 1 anchor over a shared history.

LongLive's layout: sink 3, window 12, 33 resident frames, blocks of 3, P = 5 routed blocks. The
history (``HISTORY`` = 18 frames, so that history and window fill the reference's 33-frame
cache exactly and it never rolls) is generated once and shared; then every row generates the
routed window (``WINDOW`` = 5 blocks of 3 frames, 4 denoising steps + a context pass per
block). Row ``g < G`` attends to sink ++ 5 random older frames ++ the nearest frames; the anchor
to the default sink + window. Providers, measured in the same run on the same weights, noise and
plans:

- ``sequential restore`` (baseline, the reference implementation's way, as in the KVPO authors'
  LongLive code: ``trainer/kvpo.py`` rollout, ``pipeline/diversity_sampling.py`` save/restore,
  ``wan/modules/causal_model.py`` attention): one branch at a time over a dense per-layer cache
  of ``resident_frames`` capacity; the state is saved to the host and deep-copied before the
  fork, and restored into the device cache before each branch; every attention call clones the
  layer's whole cache, writes the block's K/V into the clone, gathers the routed older frames
  (once per block and layer, as the reference caches them), concatenates sink ++ routed ++
  nearest ++ block and runs SDPA; the context pass commits the block's K/V into the cache.
- ``batched dense clones``: the naive way to batch: every row gets its own dense clone of the
  history, one forward per step for all rows.
- ``paged shared (ours)``: rows forked from the history in a ``PagedKVStore`` (no K/V copies),
  one forward per step for all G + 1 rows through ``routed_attention`` reading pages in place;
  branch frames go to private pages; the history is trimmed to the frames the rows read and
  the rows are lean (they release frames no later view reads), as in the trainer.
- ``paged, one row at a time (ours)``: each row forked, generated and freed in turn (least
  memory: the history once plus one row's private frames; no copies).

``held MiB``: K/V bytes held at the rollout's peak (for the reference: the device cache and the
two host copies; for the clones: the snapshot and the clones; for the paged store its pages in
use; the reference's per-call clone of one layer is transient and shows in ``peak MiB`` only).
``peak MiB``: the harness's peak of allocations during the call (the paged pool is allocated
beforehand). The outputs of all providers agree
(checked). Shapes (CPU): ``tiny`` = the toy configuration (dim 64, 2 layers, 64 tokens/frame);
``mid`` = dim 256 (4 heads x 64), 4 layers, ffn 1024, 16 latent channels, 64 tokens/frame; fp32.
GPU (bf16): ``mid`` and ``wan1.3b-10-layers`` (Wan2.1-1.3B layers, 1560 tokens/frame, 10 of
the 30 layers so that the dense-clone provider fits). On CPU the suite runs with one intra-op
thread (restored afterwards): the development machine's 2 cores are shared, and oversubscribed
OpenMP threads make small GEMMs 20x slower and noisy.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from kvpo.models import WAN_1_3B, CachePolicy, FewStepSampler, FrameCache, generate, tiny_config
from kvpo.models.causal_wan import CausalWan

SUITE = "group_rollout"
G, HISTORY, WINDOW = 8, 18, 5
POLICY = CachePolicy(sink_size=3, local_attn_size=12, resident_frames=33, frames_per_block=3)
CONFIGS = {
    "tiny": tiny_config(),
    "mid": tiny_config(
        num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=4, in_channels=16,
        out_channels=16, text_dim=64, patch_size=(1, 2, 2), latent_height=16, latent_width=16,
    ),
}  # fmt: skip
GPU_CONFIGS = {
    "mid": CONFIGS["mid"],
    "wan1.3b-10-layers": dataclasses.replace(WAN_1_3B, num_layers=10),
}


def _plans(seed=0):
    """Per window block, per row: sink ++ 5 random older frames ++ the nearest cached frame."""
    rng = random.Random(seed)
    pool = list(range(3, HISTORY - 1))
    routed = [sorted(rng.sample(pool, 5)) for _ in range(G)]
    plans = {}
    for b in range(WINDOW):
        f0 = HISTORY + 3 * b
        nearest = [f0 - 1]
        plans[f0] = [[0, 1, 2, *r, *nearest] for r in routed] + [POLICY.window(f0, 3)]
    return plans


class DenseCache:
    """The reference layout: per layer one dense ``[B, capacity, H, D]`` K and V buffer."""

    def __init__(self, k, v, frames, per_frame):
        self.k, self.v, self.frames, self.per_frame = k, v, list(frames), per_frame

    def clone(self, rows, capacity_frames, device):
        """Restore: a working copy on ``device`` with room for ``capacity_frames`` more."""
        pad = (0, 0, 0, 0, 0, capacity_frames * self.per_frame)
        k = [F.pad(t.to(device), pad).expand(rows, -1, -1, -1).clone() for t in self.k]
        v = [F.pad(t.to(device), pad).expand(rows, -1, -1, -1).clone() for t in self.v]
        return DenseCache(k, v, self.frames, self.per_frame)

    def context(self, plans, start_frame=None):
        return DenseContext(self, plans, start_frame)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class DenseContext:
    """Gather the routed frames from the dense cache, then SDPA over them and the block."""

    def __init__(self, cache, plans, start_frame):
        self.cache, self.start_frame = cache, start_frame
        n = cache.per_frame
        slot = {f: i for i, f in enumerate(cache.frames)}
        self.index = torch.stack(
            [
                torch.cat([torch.arange(slot[f] * n, slot[f] * n + n) for f in plan])
                for plan in plans
            ]
        )

    @property
    def writes(self):
        return self.start_frame is not None

    def attend(self, layer, q, k, v):
        idx = self.index[:, :, None, None].expand(-1, -1, *q.shape[2:])
        keys = torch.cat([self.cache.k[layer].gather(1, idx), k], dim=1)
        values = torch.cat([self.cache.v[layer].gather(1, idx), v], dim=1)
        if self.writes:
            lo = len(self.cache.frames) * self.cache.per_frame
            self.cache.k[layer][:, lo : lo + k.shape[1]] = k
            self.cache.v[layer][:, lo : lo + k.shape[1]] = v
            if layer == len(self.cache.k) - 1:
                frames = k.shape[1] // self.cache.per_frame
                self.cache.frames += range(self.start_frame, self.start_frame + frames)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, keys, values)))
        return out.transpose(1, 2)


class ReferenceBranchCache:
    """The reference's dense cache of one branch: per layer ``[1, capacity, H, D]`` K and V.

    Shaped like the host snapshot (``resident_frames`` capacity); ``restore`` copies it in;
    ``context`` serves the block's attention calls the reference's way (see the module
    docstring). No rolling: the benchmark's history and window fit the capacity, as they do in
    the reference before its cache fills.
    """

    def __init__(self, snapshot: DenseCache, device):
        self.k = [torch.empty_like(t, device=device) for t in snapshot.k]
        self.v = [torch.empty_like(t, device=device) for t in snapshot.v]
        self.per_frame, self.snapshot = snapshot.per_frame, snapshot

    def restore(self):
        """Copy the host snapshot into the device cache (``restore_state``)."""
        for dst, src in zip(self.k + self.v, self.snapshot.k + self.snapshot.v):
            dst.copy_(src)
        self.frames = list(self.snapshot.frames)
        self.routed = {}  # the routed older frames, gathered once per (block, layer)

    def context(self, plan, start_frame, writes):
        return ReferenceContext(self, plan, start_frame, writes)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class ReferenceContext:
    """One forward's attention calls: clone the layer cache, write, concatenate, SDPA."""

    def __init__(self, cache, plan, start_frame, writes):
        """``plan``: frames ``sink ++ older ++ [nearest]`` (a routing plan or the window)."""
        self.cache, self.start_frame, self.writes = cache, start_frame, writes
        n, slot = cache.per_frame, {f: i for i, f in enumerate(cache.frames)}
        older = plan[POLICY.sink_size : -1]
        self.sink = slot[plan[POLICY.sink_size - 1]] * n + n
        self.older = torch.cat([torch.arange(slot[f] * n, slot[f] * n + n) for f in older])
        self.nearest = slot[plan[-1]] * n

    def attend(self, layer, q, k, v):
        cache, end = self.cache, len(self.cache.frames) * self.cache.per_frame
        temp_k, temp_v = cache.k[layer].clone(), cache.v[layer].clone()
        temp_k[:, end : end + k.shape[1]], temp_v[:, end : end + k.shape[1]] = k, v
        routed = cache.routed.get((self.start_frame, layer))
        if routed is None:
            routed = temp_k[:, self.older].clone(), temp_v[:, self.older].clone()
            cache.routed[(self.start_frame, layer)] = routed
        recent = slice(self.nearest, end + k.shape[1])  # nearest cached frame ++ the block
        keys = torch.cat([temp_k[:, : self.sink], routed[0], temp_k[:, recent]], 1)
        values = torch.cat([temp_v[:, : self.sink], routed[1], temp_v[:, recent]], 1)
        if self.writes:
            cache.k[layer][:, end : end + k.shape[1]] = k
            cache.v[layer][:, end : end + k.shape[1]] = v
            if layer == len(cache.k) - 1:
                cache.frames += range(
                    self.start_frame, self.start_frame + k.shape[1] // cache.per_frame
                )
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, keys, values)))
        return out.transpose(1, 2)


def _reference_rollout(model, history, text, noise, renoise, plans, rows_n):
    """The reference: ``save_state`` to the host and its deep copy, then per branch restore."""
    pad = (0, 0, 0, 0, 0, (POLICY.resident_frames - len(history.frames)) * history.per_frame)

    def host_copy(cache):  # the reference saves the whole preallocated cache, unused slots too
        return DenseCache(
            [F.pad(t, pad).cpu() for t in cache.k],
            [F.pad(t, pad).cpu() for t in cache.v],
            cache.frames,
            cache.per_frame,
        )

    saved = host_copy(history)  # save_state
    state = DenseCache(  # kv_state_before_fork = copy.deepcopy(saved_state)
        [t.clone() for t in saved.k], [t.clone() for t in saved.v], saved.frames, saved.per_frame
    )
    cache = ReferenceBranchCache(state, noise.device)
    sampler, outs = FewStepSampler(), []
    for g in range(rows_n):
        cache.restore()
        out = []
        for f0 in sorted(plans):
            lo, plan = f0 - HISTORY, plans[f0][g]
            x, xi = noise[g : g + 1, :, lo : lo + 3], renoise[:, g : g + 1, :, lo : lo + 3]
            x0, _ = sampler.denoise_block(model, x, text, f0, cache.context(plan, f0, False), xi)
            model.write_context(x0, text, f0, cache.context(plan, f0, True))
            out.append(x0)
        outs.append(torch.cat(out, dim=2))
    held = cache.nbytes() + saved.nbytes() + state.nbytes()
    return torch.cat(outs), held


def _dense_rollout(model, history, text, noise, renoise, plans, rows):
    """Rows ``rows`` (indices into the group) in one batch over dense clones of the history."""
    cache = history.clone(len(rows), WINDOW * 3, noise.device)
    sampler, out = FewStepSampler(), []
    for f0 in sorted(plans):
        lo = f0 - HISTORY
        row_plans = [plans[f0][r] for r in rows]
        x, xi = noise[rows, :, lo : lo + 3], renoise[:, rows, :, lo : lo + 3]
        x0, _ = sampler.denoise_block(model, x, text, f0, cache.context(row_plans), xi)
        model.write_context(x0, text, f0, cache.context(row_plans, f0))
        out.append(x0)
    return torch.cat(out, dim=2), history.nbytes() + cache.nbytes()


def _assert_agree(out, ref):
    """fp32 (CPU): to rounding; bf16 (GPU): mean relative difference under 5%."""
    if out.dtype == torch.float32 and out.device.type == "cpu":
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    else:
        rel = (out.float() - ref.float()).abs().mean() / ref.float().abs().mean()
        assert rel < 0.05, f"providers disagree: mean relative difference {float(rel):.3f}"


@pytest.mark.parametrize("size", ["tiny", "mid", "wan1.3b-10-layers"])
def test_group_rollout(recorder, device, size, one_cpu_thread):
    configs = GPU_CONFIGS if device.type == "cuda" else CONFIGS
    if size not in configs:
        pytest.skip(f"{size} runs on {'CPU' if device.type == 'cuda' else 'GPU'} only")
    torch.manual_seed(0)
    cfg = configs[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = CausalWan.from_config(cfg, dtype=dtype, device=device).eval()
    rows_n, per_frame = G + 1, cfg.tokens_per_frame
    text = model.encode_text(torch.randn(1, 16, cfg.text_dim, device=device))
    shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    hist_noise = torch.randn(1, shape[0], HISTORY, *shape[1:], device=device)
    hist_renoise = torch.randn(3, 1, shape[0], HISTORY, *shape[1:], device=device)
    noise = torch.randn(1, shape[0], 3 * WINDOW, *shape[1:], device=device).expand(
        rows_n, -1, -1, -1, -1
    )
    renoise = torch.randn(3, 1, shape[0], 3 * WINDOW, *shape[1:], device=device).expand(
        -1, rows_n, -1, -1, -1, -1
    )
    plans = _plans()
    pages = HISTORY + rows_n * 3 * WINDOW + 4
    cache = FrameCache.create(cfg, POLICY, num_pages=pages, dtype=dtype, device=device)
    (root,) = cache.new_rows(1)
    with torch.no_grad():
        generate(model, cache, [root], text, hist_noise, renoise=hist_renoise)
        k, v = [], []
        view = cache.view([root], HISTORY, 3, plans=[list(range(HISTORY))])
        for layer in range(cfg.num_layers):
            kv = cache.store.kv_pages(layer)[view.page_table[0].long()]
            k.append(kv[:, 0].flatten(0, 1)[None].cpu())  # the snapshot lives on the host
            v.append(kv[:, 1].flatten(0, 1)[None].cpu())
    history = DenseCache(k, v, range(HISTORY), per_frame)
    read = {f for frame_plans in plans.values() for plan in frame_plans for f in plan}
    cache.retain(root, sorted(f for f in read if f < HISTORY))  # what the rows read
    frame_bytes = 2 * cfg.num_layers * per_frame * cfg.dim * cache.store.pool.element_size()

    def sequential():
        return _reference_rollout(model, history, text, noise, renoise, plans, rows_n)

    def batched_clones():
        return _dense_rollout(model, history, text, noise, renoise, plans, list(range(rows_n)))

    def paged(group):
        """Rows ``group`` forked from the history and generated in one batch."""
        rows = cache.fork(root, len(group), lean=True)
        cache.store.reset_peak()
        gen = generate(
            model, cache, rows, text, noise[group], renoise=renoise[:, group],
            start_frame=HISTORY, plans=lambda f0: [plans[f0][g] for g in group],
        )  # fmt: skip
        held = cache.store.peak_held_bytes
        cache.free(rows)
        return gen.latents, held

    def paged_one_at_a_time():
        outs = [paged([g]) for g in range(rows_n)]
        return torch.cat([o for o, _ in outs]), max(h for _, h in outs)

    providers = [
        ("sequential restore (reference)", sequential, True),
        ("batched dense clones", batched_clones, False),
        ("paged shared, G+1 rows batched (ours)", lambda: paged(list(range(rows_n))), False),
        ("paged shared, one row at a time (ours)", paged_one_at_a_time, False),
    ]
    case = (
        f"{size}: dim {cfg.dim} x {cfg.num_layers} layers, {per_frame} tok/frame, G={G}+anchor, "
        f"history {HISTORY} frames, window {WINDOW} blocks x 3 frames, 4 steps + context pass"
    )
    reference = None
    with torch.no_grad():
        for name, fn, baseline in providers:
            out, held = fn()
            if reference is None:
                reference = out
            _assert_agree(out, reference)
            recorder.measure(
                SUITE, case, name, fn, device, baseline=baseline, held_bytes=held,
                kv_frames_held=round(held / frame_bytes, 1),
            )  # fmt: skip


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
