"""The KVPO reference implementation's K/V copies, counted from its code, and the batched
dense-clone scheme, counted (the numbers of :mod:`benchmarks.kv_accounting`, whose docstring
describes both schemes).

A :class:`Layout` is a group step's cache layout; a :class:`Ledger` the K/V frames a scheme holds
and copies, by kind.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

TEXT_TOKENS = 512  # streaming_training.py _initialize_crossattn_cache: [B, 512, 12, 128] per layer


@dataclass(frozen=True)
class Layout:
    """A group step's geometry, in latent frames. Defaults: the cache and routing sizes of the
    reference's ``configs/train_kvpo_longlive.yaml``; the video (72 frames, switches at 30 and
    57) of this repository's ``tests/kvpo/test_kv_retention.py``."""

    total_frames: int = 72  # streaming_max_length (the reference's config: 147)
    chunk_size: int = 21  # streaming_chunk_size
    min_new_frame: int = 18  # streaming_min_new_frame
    frames_per_block: int = 3  # num_frame_per_block
    sink: int = 3  # model_kwargs.sink_size
    local_attn: int = 12  # model_kwargs.local_attn_size
    slice_last_frames: int = 21  # the cache holds local_attn + slice_last_frames frames
    denoising_steps: int = 4  # len(denoising_step_list)
    perturb_blocks: int = 5  # perturb_num_blocks (P)
    m_nearest: int = 4  # m_nearest_frames
    branches: int = 8  # K (G)
    switches: tuple[int, ...] = (30, 57)  # switch_frame_indices, before alignment (config: 39, ..)
    log_prob_grad_steps: int = 2  # log_prob_grad_steps: grad-carrying steps of the pi_theta replay
    gradient_checkpointing: bool = True

    @property
    def resident(self) -> int:
        """streaming_training.py StreamingTrainingPipeline.__init__: kv_cache_size =
        (local_attn_size + slice_last_frames) * frame_seq_length tokens."""
        return self.local_attn + self.slice_last_frames

    @property
    def recache_pass_frames(self) -> int:
        """diversity_sampling.py recache_after_switch: max(1, seq_len // frame_seq_length), with
        wan_wrapper.py seq_len = 1560 * local_attn_size if local_attn_size > 21 else 32760."""
        return self.local_attn if self.local_attn > 21 else 32760 // 1560

    def chunks(self) -> list[tuple[int, int]]:
        """``(start, frames)``: diversity_sampling.py _compute_chunk_layout."""
        out, start = [], 0
        while start < self.total_frames:
            end = min(start + (self.min_new_frame if out else self.chunk_size), self.total_frames)
            out.append((start, end - start))
            start = end
        return out

    def aligned_switches(self) -> list[int]:
        """kvpo.py _resolve_switch_frame_indices with align_switch_to_chunk: each switch moves to
        the first later chunk start (the last chunk start when none)."""
        starts = [s for s, _ in self.chunks()[1:]]
        return [next((s for s in starts if s >= w), starts[-1]) for w in self.switches]

    def segment(self, frame: int) -> int:
        """kvpo.py rollout _seg_for_frame over the aligned switches."""
        return sum(frame >= w for w in self.aligned_switches())

    def fork_chunk(self, fork: int) -> int:
        """Index of the chunk holding the fork, checked against plan_perturbation's eligibility
        (diversity_sampling.py): history >= local_attn_size, P blocks inside the chunk, a pool of
        older frames >= n_random."""
        F, P = self.frames_per_block, self.perturb_blocks
        for ci, (start, frames) in enumerate(self.chunks()):
            if start <= fork < start + frames:
                bi = (fork - start) // F
                if (fork - start) % F or fork < self.local_attn or bi + P > frames // F:
                    break
                lo, hi = self.routing_pool(fork)
                if hi - lo < self.n_random:
                    break
                return ci
        raise ValueError(f"frame {fork} is no eligible fork of the reference's plan_perturbation")

    @property
    def n_random(self) -> int:
        """plan_perturbation: n_random = max(max(local_attn_size - sink_size, 0) - m, 0)."""
        return max(max(self.local_attn - self.sink, 0) - self.m_nearest, 0)

    def routing_pool(self, fork: int) -> tuple[int, int]:
        """plan_perturbation: [stable_pool_start, stable_pool_end) of the older frames."""
        last = fork + (self.perturb_blocks - 1) * self.frames_per_block
        lo = max(self.sink, last - max(self.resident - self.sink, 0))
        return lo, fork - self.m_nearest


@dataclass
class Ledger:
    """K/V of one scheme over one phase, in frames (K and V of a latent frame, all layers).

    ``copies``: frames copied, by kind. ``operands``: frames the attention calls concatenate
    into their operand (transient; not in :attr:`copied`). ``text_caches``: copies of the whole
    cross-attention cache (``TEXT_TOKENS`` tokens a layer), by kind. ``held``: frames alive now,
    by location; ``peak`` / ``peak_at``: the most alive at once and where.
    """

    copies: Counter = field(default_factory=Counter)
    operands: Counter = field(default_factory=Counter)
    text_caches: Counter = field(default_factory=Counter)
    held: Counter = field(default_factory=Counter)
    peak: int = 0
    peak_at: dict = field(default_factory=dict)

    def copy(self, kind: str, frames: int) -> None:
        self.copies[kind] += frames

    def hold(self, where: str, frames: int) -> None:
        self.held[where] += frames
        if sum(self.held.values()) > self.peak:
            self.peak, self.peak_at = sum(self.held.values()), dict(self.held)

    def release(self, where: str, frames: int) -> None:
        self.held[where] -= frames
        if self.held[where] < 0:
            raise AssertionError(f"released more {where} frames than held")

    @property
    def copied(self) -> int:
        return sum(self.copies.values())


# --------------------------------------------------------------------- the reference, counted
@dataclass
class _DenseCache:
    """The reference's cache of one row: per layer a dense ``[1, resident x 1560, 12, 128]`` K and
    V buffer plus ``global_end_index`` / ``local_end_index`` (here in frames)."""

    global_end: int = 0
    local_end: int = 0
    perturb: tuple[int, int] | None = None  # [start, end) frames of the active perturbation
    routed_cached: bool = False  # _kv_perturb_cached_k/_v set


class _Reference:
    """The reference's cache operations over all layers, counted into a :class:`Ledger`."""

    def __init__(self, layout: Layout, ledger: Ledger) -> None:
        self.layout, self.led = layout, ledger

    def forward(self, cache: _DenseCache, start: int, n: int, update_cache: bool = True) -> None:
        """One model call on ``n`` frames from ``start``: causal_model.py
        CausalWanSelfAttention.forward in every layer, then CausalWanModel._apply_cache_updates
        (``_forward_inference``; ``update_cache`` as passed by the wrapper)."""
        L, led = self.layout, self.led
        R, sink, end = L.resident, L.sink, start + n
        is_recompute = end <= cache.global_end and start > 0  # forward: is_recompute
        if end > cache.global_end and n + cache.local_end > R:  # forward: the rolling branch
            evicted = n + cache.local_end - R  # num_evicted_tokens
            rolled = cache.local_end - evicted - sink  # num_rolled_tokens
            local_end = cache.local_end + end - cache.global_end - evicted
            led.copy("per-call clone", R)  # temp_k = kv_cache["k"].clone() (and temp_v)
            # temp_k[:, sink : sink + rolled] = temp_k[:, sink + evicted : ...].clone()
            led.copy("rolling shift", 2 * rolled)
            if update_cache:  # _apply_cache_updates "roll_and_insert": the same shift in the cache
                led.copy("rolling shift", 2 * rolled)
        else:
            local_end = cache.local_end + end - cache.global_end  # forward: direct insert
            led.copy("per-call clone", R)  # temp_k = kv_cache["k"].clone() (and temp_v)
        self._operand(cache, start, local_end)
        if update_cache and not is_recompute:  # _apply_cache_updates: fill_ both indices
            cache.global_end, cache.local_end = end, local_end

    def _operand(self, cache: _DenseCache, start: int, local_end: int) -> None:
        """forward: ``k_cat`` / ``v_cat`` (sink_size > 0 and a positive local budget)."""
        L, led = self.layout, self.led
        sink, budget = L.sink, L.local_attn - L.sink  # local_budget = max_attention_size - sink
        if sink <= 0 or budget <= 0:
            raise NotImplementedError("counted for layouts with a sink and a local window only")
        p = cache.perturb
        if p is not None and p[0] <= start < p[1]:  # use_perturb
            # _build_perturbed_local_window: nearest m frames (the block included) + routed ones
            nearest = local_end - max(max(sink, local_end - budget), local_end - L.m_nearest)
            n_routed = min(L.n_random, len(range(*L.routing_pool(p[0]))))
            if n_routed and not cache.routed_cached:  # first perturbed call of the window
                self._check_routed_visible(p[0], local_end)
                led.operands["routed frames: clone + cat (first call)"] += 2 * n_routed
                cache.routed_cached = True
            if n_routed:
                led.operands["window cat"] += n_routed + nearest  # k_local = cat(cached, nearest)
            led.operands["window cat"] += sink + n_routed + nearest  # k_cat = cat(sink, perturbed)
        else:
            local = max(0, local_end - max(sink, local_end - budget))  # temp_k[:, lo:local_end]
            led.operands["window cat"] += sink + local  # k_cat = cat(k_sink, k_local)

    def _check_routed_visible(self, start: int, local_end: int) -> None:
        """Every frame of the pool passes _build_perturbed_local_window's filter, so the count of
        gathered frames does not depend on the draw."""
        L, sink, m = self.layout, self.layout.sink, self.layout.m_nearest
        visible_start = max(sink, start - max(local_end - sink, 0))
        nearest_start = max(max(sink, local_end - (L.local_attn - sink)), local_end - m)
        for frame in range(*L.routing_pool(start)):
            slot = sink + (frame - visible_start)
            if not (visible_start <= frame < start - m and sink <= slot < nearest_start):
                raise ValueError(f"routed frame {frame} may be skipped: the count depends on it")

    def generate_chunk(self, cache: _DenseCache, start: int, frames: int) -> None:
        """streaming_training.py generate_chunk_with_cache: per block every denoising step
        (last_step_only exits at the last one), then one context pass; update_cache=True."""
        F = self.layout.frames_per_block
        if frames % F:
            raise ValueError(f"{frames} frames is no whole number of blocks")
        for block in range(start, start + frames, F):
            for _ in range(self.layout.denoising_steps):  # for step_idx, current_timestep ...
                self.forward(cache, block, F)
            self.forward(cache, block, F)  # the context pass (context_noise = 0)

    def recache(self, cache: _DenseCache, current: int) -> None:
        """diversity_sampling.py recache_after_switch (global_sink=True: the cache is not zeroed;
        recache_full_kv_cache_after_switch=False: local_attn_size frames re-encoded)."""
        if current == 0:
            return
        frames = min(self.layout.local_attn, current)  # num_recache (all_lat has `current`)
        step = self.layout.recache_pass_frames
        for offset in range(0, frames, step):  # for offset in range(0, num_recache, max_pass)
            self.forward(cache, current - frames + offset, min(step, frames - offset))

    def save_state(self) -> None:
        """diversity_sampling.py save_state -> _clone_cache_list: blk["k"].clone().cpu()."""
        R, led = self.layout.resident, self.led
        led.copy("save_state: device clone", R)  # .clone() of the whole preallocated cache
        led.copy("save_state: device to host", R)  # .cpu()
        led.text_caches["save_state"] += 2  # _clone_crossattn_cache: .clone().cpu()
        led.hold("host", R)

    def deepcopy(self) -> None:
        """kvpo.py rollout: kv_state_before_fork = copy.deepcopy(self.pipeline._saved_state)."""
        R = self.layout.resident
        self.led.copy("deep copy (host)", R)
        self.led.text_caches["deep copy"] += 1
        self.led.hold("host", R)

    def restore_state(self) -> None:
        """diversity_sampling.py restore_state -> _restore_cache_list:
        dst["k"].copy_(src["k"].to(dst["k"].device))."""
        R = self.layout.resident
        self.led.copy("restore_state: host to device", R)  # src["k"].to(device)
        self.led.copy("restore_state: device copy_", R)  # dst["k"].copy_(...)
        self.led.text_caches["restore_state"] += 2  # _restore_crossattn_cache, likewise


def reference_rollout(layout: Layout, fork: int) -> tuple[Ledger, _DenseCache]:
    """The reference's rollout of one group (kvpo.py KVPOTrainer.rollout): counts and the cache
    state saved before the fork (what the replay starts from)."""
    L, led = layout, Ledger()
    ref, chunks, R = _Reference(L, led), L.chunks(), L.resident
    pi = L.fork_chunk(fork)  # plan["perturb_chunk_idx"]
    offset = fork - chunks[pi][0]  # fork_offset_in_chunk
    led.hold("device", R)  # pipeline._initialize_kv_cache(batch_size=1): 30 x [1, R x 1560, ..]
    cache, seg, current = _DenseCache(), 0, 0
    for ci in range(pi):  # the prefix: for ci, ch in enumerate(chunks): if ci >= perturb_idx: break
        if L.segment(current) != seg:  # new_seg != seg_idx
            ref.recache(cache, current)  # pipeline.recache_after_switch(prefix_latents, ...)
            seg = L.segment(current)
        ref.generate_chunk(cache, current, chunks[ci][1])  # generate_chunk_sampling
        current += chunks[ci][1]
    ref.save_state()  # self.pipeline.save_state()
    if offset > 0:  # if fork_offset_in_chunk > 0:
        ref.restore_state()  # self.pipeline.restore_state()
        ref.generate_chunk(cache, current, offset)  # the pre-fork part, prompt cond_list[seg_idx]
        ref.save_state()  # self.pipeline.save_state(): the new state replaces the first one ...
        led.release("host", R)  # ... which nothing references any more
    ref.deepcopy()  # kv_state_before_fork = copy.deepcopy(self.pipeline._saved_state)
    fork_state = dataclasses.replace(cache)
    for g in range(L.branches + 1):  # for g in range(G), then the anchor (row G)
        if g == 0:  # self.pipeline._saved_state = kv_state_before_fork: the saved state goes
            led.release("host", R)
        ref.restore_state()  # self.pipeline.restore_state()
        cache = dataclasses.replace(fork_state)
        current, seg = fork, L.segment(fork)  # cur_len = fork_abs; cur_seg = _seg_for_frame(..)
        for ci in range(pi, len(chunks)):  # for ci in range(perturb_idx, len(chunks))
            if L.segment(current) != seg:  # new_seg != cur_seg
                ref.recache(cache, current)  # pipeline.recache_after_switch(branch_latents, ..)
                seg = L.segment(current)
            if ci == pi:  # is_perturb: noise = perturb_chunk_noise[:, fork_offset_in_chunk:]
                frames = chunks[ci][0] + chunks[ci][1] - fork
                if g < L.branches:  # pipeline.activate_perturbation(branch plan, fork, fork+P*F)
                    end = fork + L.perturb_blocks * L.frames_per_block
                    cache.perturb = (fork, end)
            else:
                frames = chunks[ci][1]  # shared_nonperturb_noises[ci] (need_global: to the end)
            ref.generate_chunk(cache, current, frames)
            cache.perturb, cache.routed_cached = None, False  # deactivate_perturbation()
            current += frames
    return led, fork_state


def reference_replay_pass(layout: Layout, fork: int, fork_state: _DenseCache, grad: bool):
    """One replay of the G branches (kvpo.py _compute_trajectory_log_prob, via
    _compute_policy_log_scores from train_step): ``grad=False`` as for pi_old and pi_init,
    ``grad=True`` as for pi_theta (the first ``log_prob_grad_steps`` steps of every block carry
    gradient, under torch.utils.checkpoint when gradient_checkpointing)."""
    L, led = layout, Ledger()
    ref, R, F = _Reference(L, led), L.resident, L.frames_per_block
    start, frames = L.chunks()[L.fork_chunk(fork)]
    blocks = (start + frames - fork) // F  # the trajectory of the fork chunk's blocks
    led.hold("device", R)  # pipeline.kv_cache1, allocated by the rollout, never freed
    led.hold("host", R)  # rollout_result["kv_state_before_fork"]
    kept = []
    checkpointed = grad and L.gradient_checkpointing  # use_ckpt = gradient_checkpointing and grad
    for _ in range(L.branches):  # for out_idx, g in enumerate(active_branch_ids)
        cache = dataclasses.replace(fork_state)
        led.copy("replay: host to device", R)  # _materialize_cache_list: blk["k"].to(device)
        led.copy("replay: device clone", R)  # ... .clone()
        led.text_caches["replay materialise"] += 2  # _materialize_crossattn_cache, likewise
        led.hold("device", R)
        recomputed = []
        for bi in range(blocks):
            block = fork + bi * F  # block_token_start
            for step in range(L.denoising_steps):
                ref.forward(cache, block, F, update_cache=False)  # _gen_forward_single
                if checkpointed and step < L.log_prob_grad_steps:  # step_needs_grad and use_ckpt
                    recomputed.append(block)
            if bi < blocks - 1:  # the context pass between blocks, update_cache=True
                ref.forward(cache, block, F)
        if checkpointed:  # the checkpoint holds its arguments, kv_cache among them, until
            kept.append((cache, recomputed))  # the backward: `del kv_cache` frees nothing
        else:
            led.release("device", R)  # del kv_cache
    for cache, recomputed in kept:  # train_step: total_loss.backward() recomputes every
        for block in recomputed:  # checkpointed call on the cache as it is then
            ref.forward(cache, block, F, update_cache=False)
        led.release("device", R)
    return led


def reference_group_step(layout: Layout, fork: int) -> dict[str, Ledger]:
    """The reference's ledgers of one group step: ``rollout``, ``replay`` (one pass without
    grad: pi_old, pi_init) and ``replay_grad`` (the pi_theta pass)."""
    rollout, fork_state = reference_rollout(layout, fork)
    return {
        "rollout": rollout,
        "replay": reference_replay_pass(layout, fork, fork_state, grad=False),
        "replay_grad": reference_replay_pass(layout, fork, fork_state, grad=True),
    }


# --------------------------------------------------------------------- batched dense clones
def dense_clones_rollout(layout: Layout) -> Ledger:
    """Every one of the G + 1 rows gets a dense clone of the fork-state cache (resident frames);
    the fork state itself is kept for the replay."""
    led, R = Ledger(), layout.resident
    led.hold("device", R)  # the prefix row's cache: the fork state
    for _ in range(layout.branches + 1):
        led.copy("dense clone per row", R)
        led.hold("device", R)
    return led


def dense_clones_replay_pass(layout: Layout) -> Ledger:
    """One batched replay of the G branches, each from a dense clone of the fork state."""
    led, R = Ledger(), layout.resident
    led.hold("device", R)
    for _ in range(layout.branches):
        led.copy("dense clone per row", R)
        led.hold("device", R)
    return led
