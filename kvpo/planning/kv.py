"""K/V of a rollout, in latent frames (one page = one frame of every layer's K and V).

- the page pool the run preallocates: the code's own rule (``StreamingGenerator.pages_for``,
  MemFlow's bank pages from ``CachePolicy.bank_pages``), as ``stream_from_config`` sizes it;
- the fork positions a rollout can draw: the routing rule's eligible start blocks
  (:func:`kvpo.method.routing.eligible_start_blocks`, or MemFlow's
  :func:`kvpo.method.routing_memflow.memflow_start_blocks` under ``routing_rule: memflow``);
- the frames a rollout holds at most per phase (an upper bound of ``GroupRollout.kv_bytes``).
"""

from __future__ import annotations

from kvpo.models.config import WanConfig
from kvpo.training.config import TrainConfig


def start_frames(cfg: TrainConfig) -> list[int]:
    """Every fork frame the config's routing rule can draw, ascending."""
    from kvpo.method.routing import eligible_start_blocks
    from kvpo.method.routing_memflow import memflow_start_blocks

    rule = memflow_start_blocks if cfg.routing_rule == "memflow" else eligible_start_blocks
    found = rule(cfg.routing_geometry(), cfg.chunks(), cfg.perturb_within_first_x_chunks)
    return [s.start_frame for s in found]


def bank_pages(cfg: TrainConfig, model: WanConfig) -> int:
    """MemFlow's bank pages one row holds at most over a training video
    (``CachePolicy.bank_pages``; 0 without a bank)."""
    return cfg.cache_policy().bank_pages(model.num_layers, cfg.latent_layout().num_frames)


def pool_pages(cfg: TrainConfig, rows: int, model: WanConfig) -> int:
    """Pages of the preallocated pool for ``rows`` rows in flight: ``StreamingGenerator.
    pages_for`` with the arguments ``stream_from_config`` gives it (the policy frames and the
    bank pages of a ``model.num_layers``-layer model)."""
    from kvpo.streaming import StreamingGenerator

    policy = cfg.cache_policy()
    return StreamingGenerator.pages_for(policy, rows, cfg.policy_frames(), bank_pages(cfg, model))


def snapshot_frames(cfg: TrainConfig, fork: int) -> int:
    """Frames of the fork snapshot: the sink, the default window at the fork and every frame
    a branch's routed context can name (an upper bound of ``rollout.shared_frames``).

    LongLive's rule: ``sink + (fork - max(sink, fork + P F - (resident - sink)))``. MemFlow's:
    the frames of the slots ``[0, min(fork, resident) - m)`` at the fork
    (:func:`~kvpo.method.routing_memflow.slot_frame`) and the window.
    """
    sink, R = cfg.model_kwargs.sink_size, cfg.resident_frames
    if cfg.routing_rule == "memflow":
        from kvpo.method.routing_memflow import slot_frame

        geometry, policy = cfg.routing_geometry(), cfg.cache_policy()
        pool = max(min(fork, R) - cfg.m_nearest_frames, 0)
        frames = {slot_frame(geometry, fork, p) for p in range(pool)}
        frames |= set(range(min(sink, fork))) | set(policy.window(fork, cfg.num_frame_per_block))
        return len(frames)
    window = cfg.perturb_num_blocks * cfg.num_frame_per_block
    return min(sink, fork) + max(0, fork - max(sink, fork + window - (R - sink)))


def kv_held_frames(cfg: TrainConfig, rows: int, fork: int, bank: int = 0) -> dict[str, int]:
    """Most frames of K/V held during each rollout phase, ``rows`` rows in flight, fork at
    ``fork``: the prefix row (``min(fork, resident)``), then the snapshot plus each live row's
    private frames. A row keeps at most ``local_attn_size`` frames besides what it shares; its
    sink stays shared unless a prompt switch re-encodes the window (a recache writes
    ``local_attn_size`` frames), so the private frames are ``local_attn_size - sink`` in a phase
    without a switch and ``local_attn_size`` in one with (``resident`` for a global window).
    ``bank``: MemFlow's bank pages one row holds at most (:func:`bank_pages`), counted for the
    prefix row, the snapshot and every live row (an upper bound: a recorded frame still in the
    window is one page)."""
    local, sink = cfg.model_kwargs.local_attn_size, cfg.model_kwargs.sink_size
    if local <= 0:
        local, sink = cfg.resident_frames, 0
    end = fork + cfg.perturb_num_blocks * cfg.num_frame_per_block
    switches = cfg.switch_frames
    in_window = any(fork < s < end for s in switches)
    after = (
        any(end <= s < cfg.streaming_max_length for s in switches) if cfg.train_global else False
    )
    shared = snapshot_frames(cfg, fork) + bank
    return {
        "prefix": min(fork, cfg.resident_frames) + bank,
        "window": shared + rows * ((local if in_window else local - sink) + bank),
        "continuation": shared + rows * ((local if after or in_window else local - sink) + bank),
    }
