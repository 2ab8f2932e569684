"""K/V held by a group rollout at LongLive's cache layout: bounded by what attention reads.

Layout: sink 3, local window 12, 33 resident frames, blocks of 3, P = 5 routed blocks, m = 4,
G = 8 branches + the anchor, 72 latent frames with prompt switches at 30 and 57 (recache of the
last 12 frames at each): the window from frame 24 has a switch inside it, the one from frame 42
a switch in the prefix and one in the continuation. The bound is counted here from the layout,
not from the cache's code: the shared history (sink, the default window at the fork, every
branch's routed frames) plus ``local_attn_size`` frames per row in flight. Outputs are checked
against rows generated from frame 0 in a plain (non-lean) cache.
"""

import pytest
import torch

from kvpo.method.rollout import rollout_group
from kvpo.method.routing import RoutingGeometry, chunk_layout, plan_routing
from kvpo.models import (
    CachePolicy,
    CausalWan,
    FewStepSampler,
    FlowSchedule,
    FrameCache,
    generate,
    tiny_config,
)
from kvpo.rewards.clips import VideoLayout
from kvpo.streaming import StreamingGenerator, VideoNoise
from kvpo.video_model import VideoModel

T, SWITCHES, G = 72, (30, 57), 8
SINK, LOCAL, RESIDENT, F = 3, 12, 33, 3
POLICY = CachePolicy(sink_size=SINK, local_attn_size=LOCAL, resident_frames=RESIDENT)
GEOMETRY = RoutingGeometry(F, SINK, LOCAL, RESIDENT, 4, 5)
SCHEDULE = FlowSchedule((1000, 500), shift=2.0)
CHUNKS = chunk_layout(T, 21, 18)  # [0, 21) [21, 39) [39, 57) [57, 72)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_config(
        num_layers=1, num_attention_heads=1, latent_height=4, latent_width=4, text_dim=16
    )
    model = CausalWan.from_config(cfg).eval()
    texts = [model.encode_text(torch.randn(1, 5, 16)) for _ in range(3)]
    return model, texts


def _plan(fork: int):
    for seed in range(200):
        plan = plan_routing(GEOMETRY, CHUNKS, G, seed=seed, step=0)
        if plan.start_frame == fork:
            return plan
    raise AssertionError(f"no seed gives a fork at frame {fork}")


def _shared_history(plan) -> set[int]:
    """Frames before the fork any row reads: sink, the default window, the routed frames."""
    fork = plan.start_frame
    frames = set(range(SINK)) | set(range(fork - (LOCAL - SINK - F), fork))
    for g in range(G):
        frames |= set(plan.routed[g])
    return frames


@pytest.mark.parametrize("fork", [24, 42])
def test_rollout_kv_bounded_by_what_attention_reads(setup, fork):
    model, texts = setup
    plan = _plan(fork)
    C = model.config.in_channels
    noise = VideoNoise.draw(5, (C, T, 4, 4), SCHEDULE.num_steps, "cpu", torch.float32)
    video_model = VideoModel(model, None, None, lambda f: f, (C, 4, 4))
    frame_bytes = model.config.kv_bytes_per_frame(4)
    shared = len(_shared_history(plan))
    results = {}
    for row_batch in (0, 1):
        stream = StreamingGenerator(
            video_model, POLICY, SCHEDULE, rule="x0", layout=VideoLayout(T, SWITCHES),
            rows=G + 1,
        )  # fmt: skip
        ro = rollout_group(
            stream, texts, plan, noise, policy_frames=GEOMETRY.window_frames, end_frame=T,
            row_batch=row_batch,
        )  # fmt: skip
        assert stream.cache.store.copied_bytes == 0  # no K/V copied, ever
        assert stream.cache.held_bytes == shared * frame_bytes  # the trimmed fork snapshot
        results[row_batch] = ro
    batched, single = results[0].kv_bytes, results[1].kv_bytes
    # all G + 1 rows in flight: the history once plus local_attn_size frames a row
    for phase in ("window", "continuation"):
        assert batched[phase] <= (shared + (G + 1) * LOCAL) * frame_bytes, (phase, batched)
    # batched dense clones hold a 33-frame cache a row plus the fork state the replay restarts
    # from: at least 2.5x more
    assert (G + 2) * RESIDENT * frame_bytes >= 2.5 * max(batched.values()), batched
    # one row at a time: never more than the reference's one 33-frame cache
    assert max(single.values()) <= RESIDENT * frame_bytes, single
    torch.testing.assert_close(results[0].latents, results[1].latents, rtol=1e-5, atol=1e-5)

    # the anchor and one branch equal rows generated from frame 0 in a plain cache
    for g in (0, G):
        cache = FrameCache.create(model.config, POLICY, 128)

        def plans(frame, g=g):
            if g == G or not plan.in_window(frame):
                return None
            return [plan.context_frames(g, frame)]

        with torch.no_grad():
            ref = generate(
                model, cache, cache.new_rows(1), texts[0], noise.noise,
                sampler=FewStepSampler(SCHEDULE), renoise=noise.renoise,
                switches={f: texts[k + 1] for k, f in enumerate(SWITCHES)}, plans=plans,
            )  # fmt: skip
        torch.testing.assert_close(results[0].latents[g], ref.latents[0], rtol=1e-5, atol=1e-5)
