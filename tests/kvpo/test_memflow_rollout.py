"""MemFlow's bank through the group rollout and the replay: forked lean rows, the fork snapshot
and replays see the bank a plain row builds from frame 0 (the plain rows themselves are checked
against a transcription of their code in ``tests/kvpo/models/test_memory_bank.py``)."""

import pytest
import torch

from kvpo.method.replay import replay_energies, step_weights
from kvpo.method.rollout import rollout_group
from kvpo.method.routing import RoutingGeometry, chunk_layout
from kvpo.method.routing_memflow import plan_memflow
from kvpo.models import CachePolicy, CausalWan, FewStepSampler, FlowSchedule, generate, tiny_config
from kvpo.models.frame_cache import FrameCache
from kvpo.rewards.clips import VideoLayout
from kvpo.streaming import StreamingGenerator, VideoNoise
from kvpo.video_model import VideoModel

F, T, SWITCHES = 3, 15, (6,)
GEOMETRY = RoutingGeometry(F, 1, 6, 12, 3, 2)  # MemFlow: n = 6 - 3 = 3 slots, P = 2 blocks
SCHEDULE = FlowSchedule((1000, 500), shift=2.0)


def _policy(bank=2, sma=False):
    return CachePolicy(1, 6, 12, F, bank_size=bank, record_interval=1, sma=sma)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_config(num_layers=2, num_attention_heads=1, latent_height=8, latent_width=8,
                      text_dim=16)  # fmt: skip
    model = CausalWan.from_config(cfg)
    with torch.no_grad():
        model.transformer.proj_out.weight.normal_(std=0.3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    texts = [model.encode_text(torch.randn(1, 5, 16)) for _ in range(2)]
    noise = VideoNoise.draw(11, (cfg.in_channels, T, 8, 8), SCHEDULE.num_steps, "cpu",
                            torch.float32)  # fmt: skip
    return model, texts, noise


def _stream(model, bank=2, sma=False):
    video_model = VideoModel(model, None, None, lambda f: f, (model.config.in_channels, 8, 8))
    layout = VideoLayout(T, SWITCHES)
    return StreamingGenerator(
        video_model, _policy(bank, sma), SCHEDULE, rule="x0", layout=layout, rows=4
    )


def _alone(model, texts, noise, plan, branch, bank=2, sma=False):
    """Branch ``branch`` (None: anchor) generated from frame 0 in one plain row."""
    cache = FrameCache.create(model.config, _policy(bank, sma), 256)
    rows = cache.new_rows(1)
    if branch is not None:  # its routed frames outlive residency (MemFlow's older slots)
        cache.protect(rows[0], plan.routed[branch], until=plan.end_frame)

    def plans(frame):
        if branch is None or not plan.in_window(frame):
            return None
        return [plan.context_frames(branch, frame)]

    with torch.no_grad():
        return generate(
            model, cache, rows, texts[0], noise.noise,
            sampler=FewStepSampler(SCHEDULE), renoise=noise.renoise, switches={6: texts[1]},
            plans=plans,
        ).latents  # fmt: skip


@pytest.mark.parametrize("first_chunk", [6, 9])
def test_rollout_rows_see_the_bank_of_a_plain_row(setup, first_chunk):
    """Forked lean rows (micro-batches of 2) generate what a plain row generates with the same
    MemFlow plan; the bank changes the videos."""
    model, texts, noise = setup
    plan = plan_memflow(GEOMETRY, chunk_layout(T, first_chunk, 6), 3, seed=3, step=0)
    assert plan.start_frame == first_chunk
    stream = _stream(model)
    ro = rollout_group(
        stream, texts, plan, noise, policy_frames=GEOMETRY.window_frames, end_frame=T,
        row_batch=2,
    )  # fmt: skip
    for g in [*range(3), None]:
        ref = _alone(model, texts, noise, plan, g)
        torch.testing.assert_close(ro.latents[3 if g is None else g], ref[0], rtol=1e-5, atol=1e-5)
    without = _alone(model, texts, noise, plan, 0, bank=0)
    assert (without[0] - ro.latents[0]).abs().max() > 1e-3
    assert stream.cache.rows() == [ro.snapshot]
    stream.cache.free([ro.snapshot])
    assert stream.cache.held_bytes == 0  # the bank's page references are all returned


def _unrouted_replays_reproduce(stream, texts, plan, noise):
    """Rolls out ``plan`` unrouted and checks that replays with the rollout's weights reproduce
    its velocities (energy 0): no-grad of branches 0..2 and, with one grad step, of 0 and 1
    (the grad replay's pinned views: each block's bank kept until the second pass). Returns the
    rollout and the grad replay's energies ``[2]``."""
    ro = rollout_group(
        stream, texts, plan, noise, policy_frames=GEOMETRY.window_frames, end_frame=T,
        routed=False,
    )  # fmt: skip
    weights = step_weights(SCHEDULE, "uniform")
    with torch.no_grad():
        energy = replay_energies(stream, ro, texts, weights, branches=[0, 1, 2], grad_steps=0)
    assert energy.abs().max() < 1e-9
    pinned = replay_energies(stream, ro, texts, weights, branches=[0, 1], grad_steps=1)
    assert pinned.requires_grad and pinned.detach().abs().max() < 1e-9
    return ro, pinned


def test_replay_sees_the_rollouts_bank(setup, monkeypatch):
    """Unrouted branches replayed with the rollout's weights reproduce its velocities (energy
    0): the replay refreshes and records the bank as the rollout did. A replay that skips the
    records (their ``_denoise_blocks``: ``update_bank=False``) does not."""
    model, texts, noise = setup
    plan = plan_memflow(GEOMETRY, chunk_layout(T, 9, 6), 3, seed=3, step=0)
    stream = _stream(model)
    ro, _ = _unrouted_replays_reproduce(stream, texts, plan, noise)
    assert stream.cache.rows() == [ro.snapshot]
    weights = step_weights(SCHEDULE, "uniform")
    with torch.no_grad():
        monkeypatch.setattr(stream.cache, "bank_record", lambda rows, frame: None)
        skipped = replay_energies(stream, ro, texts, weights, branches=[0], grad_steps=0)
    assert skipped.min() > 1e-6


def test_sma_rollout_and_replay_follow_a_plain_row(setup):
    """With sparse memory activation (sink 1 + a bank of 3: 4 candidates, 3 kept from block 9
    on), forked lean rows generate what a plain row generates (the routed window attends to the
    whole bank, the other blocks select), and unrouted replays reproduce the rollout's
    velocities, grad replay included; SMA changes the videos."""
    model, texts, noise = setup
    plan = plan_memflow(GEOMETRY, chunk_layout(T, 6, 6), 3, seed=3, step=0)
    stream = _stream(model, bank=3, sma=True)
    ro = rollout_group(
        stream, texts, plan, noise, policy_frames=GEOMETRY.window_frames, end_frame=T,
        row_batch=2,
    )  # fmt: skip
    for g in [*range(3), None]:
        ref = _alone(model, texts, noise, plan, g, bank=3, sma=True)
        torch.testing.assert_close(ro.latents[3 if g is None else g], ref[0], rtol=1e-5, atol=1e-5)
        whole = _alone(model, texts, noise, plan, g, bank=3)
        assert (whole[0] - ro.latents[3 if g is None else g]).abs().max() > 1e-3
    stream.cache.free([ro.snapshot])
    ro, pinned = _unrouted_replays_reproduce(stream, texts, plan, noise)
    pinned.sum().backward()  # the gathered sink/bank keys take no gradient; the block's do
    stream.cache.free([ro.snapshot])
    assert stream.cache.held_bytes == 0


def test_page_pool_counts_the_bank():
    """Without a bank the pool is unchanged; with one every row and the snapshot get the
    policy's bank pages plus one per recorded block."""
    plain = StreamingGenerator.pages_for(_policy(0), 4, 6)
    assert StreamingGenerator.pages_for(_policy(0), 4, 6, bank_pages=0) == plain
    assert StreamingGenerator.pages_for(_policy(2), 4, 6, bank_pages=5) == plain + (5 + 2) * 5
