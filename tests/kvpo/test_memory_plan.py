"""The memory planner (kvpo.planning) against the allocator, on the CPU, at reduced sizes.

Activations are measured on the real Wan2.1-1.3B layer shape (dim 1536, 12 x 128 heads, FFN
8960, LoRA on every block linear) with 2 layers and a small latent frame; K/V on a tiny model
with the toy run's cache geometry; parameter counts against the modules built on the meta
device. Every prediction must be within 10% of its measurement (docs/memory.md lists them).
The choice of ``row_micro_batch`` and the paper-scale figures: tests/kvpo/test_memory_choice.py.
"""

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch

from benchmarks.harness import AllocationPeak
from kvpo.models import CachePolicy, CausalWan, FrameCache, tiny_config
from kvpo.models.causal_wan import cast_transformer
from kvpo.models.config import WanConfig
from kvpo.models.lora import add_lora, freeze_copy
from kvpo.planning import plan_memory
from kvpo.planning.activations import ForwardModel
from kvpo.planning.components import lora_parameters, transformer_bytes
from kvpo.planning.externals import Setup
from kvpo.planning.kv import bank_pages, kv_held_frames, pool_pages, start_frames
from kvpo.training.config_parse import load_config
from kvpo.training.optim import EMA, build_optimizer

WIDE = WanConfig(num_layers=2, latent_height=8, latent_width=16, text_dim=64)  # 32 tokens/frame
RANK, ROWS, F = 16, 2, 3
MEASURED: list[str] = []  # printed with -s: the numbers docs/memory.md quotes


@dataclass
class Measured:
    """Peak and net bytes of one call above the level before it, and its result."""

    peak: int
    net: int
    result: object = None


def measure(fn) -> Measured:
    """Run ``fn()`` once on the CPU under :class:`benchmarks.harness.AllocationPeak`."""
    with AllocationPeak("cpu") as alloc:
        result = fn()
    return Measured(alloc.bytes, alloc.net, result)


def check(what: str, predicted: int, measured: int, tol: float = 0.10) -> None:
    MEASURED.append(f"{what}: predicted {predicted:,} measured {measured:,}")
    print(MEASURED[-1])
    assert measured > 0
    assert abs(predicted - measured) <= tol * measured, MEASURED[-1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wide():
    """``{dtype: (model, text)}``: the wide 2-layer model with a rank-16 LoRA, fp32 and bf16."""
    torch.manual_seed(0)
    model = CausalWan.from_config(WIDE).requires_grad_(False)
    add_lora(model, RANK)
    with torch.no_grad():
        text = model.encode_text(torch.randn(1, 512, WIDE.text_dim))
    half = cast_transformer(copy.deepcopy(model.transformer), torch.bfloat16)
    half_model = CausalWan(half, WIDE)
    with torch.no_grad():
        half_text = half_model.encode_text(torch.randn(1, 512, WIDE.text_dim))
    return {torch.float32: (model, text), torch.bfloat16: (half_model, half_text)}


def _view(model, rows=ROWS, start=6):
    """A read-only view of ``rows`` rows holding frames [0, start) (written by context passes)."""
    policy = CachePolicy(sink_size=1, local_attn_size=6, resident_frames=9, frames_per_block=F)
    cache = FrameCache.create(model.config, policy, 32, dtype=model.dtype)
    ids = cache.new_rows(rows)
    text = model.encode_text(torch.randn(1, 8, model.config.text_dim).to(model.dtype))
    with torch.no_grad():
        for s in range(0, start, F):
            x = torch.randn(rows, 16, F, 8, 16)
            model.write_context(x, text, s, cache.view(ids, s, F, write=True))
    return cache, cache.view(ids, start, F)


def _latents(model, rows=ROWS):
    return torch.randn(rows, 16, F, WIDE.latent_height, WIDE.latent_width).to(model.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nograd_forward_peak(wide, dtype):
    model, text = wide[dtype]
    cache, view = _view(model)
    x = _latents(model)
    with torch.no_grad():
        got = measure(lambda: model(x, 500.0, text, 6, view))
    fwd = ForwardModel(WIDE, x.element_size(), RANK)
    check(f"no-grad forward peak {dtype}", fwd.nograd_peak(ROWS, F), got.peak)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
def test_saved_activations_and_backward(wide, ckpt):
    """Saved bytes of one grad forward (exact) and the peak of two forwards + their backward."""
    model, text = wide[torch.bfloat16]
    model.gradient_checkpointing = ckpt
    cache, view = _view(model)
    xs = [_latents(model) for _ in range(2)]
    fwd = ForwardModel(WIDE, 2, RANK)
    saved = fwd.saved(ROWS, F, ckpt) + fwd.output_bytes(ROWS, F)
    try:
        one = measure(lambda: model(xs[0], 750.0, text, 6, view))
        check(f"saved by one grad forward, checkpointing={ckpt}", saved, one.net)
        del one

        def step():
            outs = [model(x, t, text, 6, view) for x, t in zip(xs, (750.0, 500.0))]
            sum(o.float().square().mean() for o in outs).backward()

        got = measure(step)
    finally:
        model.gradient_checkpointing = False
        for p in model.parameters():
            p.grad = None
    # at the peak (the last layer's backward) only that layer's LoRA gradients exist yet
    layer_grads = lora_parameters(WIDE, RANK) * 2 // WIDE.num_layers
    predicted = 2 * saved + fwd.backward_working_set(ROWS, F, ckpt) + layer_grads
    check(f"two grad forwards + backward, checkpointing={ckpt}", predicted, got.peak)


def test_weights_lora_adam_ema_bytes():
    """The base weights, then the adapters, gradients, AdamW moments and EMA after one update."""
    torch.manual_seed(1)
    config = dataclasses.replace(WIDE, num_layers=1)
    built = measure(lambda: CausalWan.from_config(config, dtype=torch.bfloat16))
    model = built.result.requires_grad_(False)
    check("transformer weights bf16", transformer_bytes(config, 2), built.net, tol=0.0)
    cache, view = _view(model, rows=1)
    prompt = torch.randn(1, 8, config.text_dim).to(torch.bfloat16)
    x = torch.randn(1, 16, F, 8, 16).to(torch.bfloat16)

    def setup_and_update():
        params = add_lora(model, RANK)
        freeze_copy(model, "default", "old")
        names = {n: p for n, p in model.transformer.named_parameters() if ".default." in n}
        optimizer, _ = build_optimizer(params, 1e-3, (0.9, 0.999), 0.01, "constant", 0, 1)
        ema = EMA(names, 0.999)
        text = model.encode_text(prompt)  # through the cross-attention's to_k / to_v adapters
        model(x, 500.0, text, 6, view).float().square().mean().backward()
        optimizer.step()
        ema.update(names)
        return optimizer, ema

    got = measure(setup_and_update)
    lora = lora_parameters(config, RANK)
    predicted = 2 * lora * 2 + lora * 2 + 2 * lora * 2 + lora * 4  # adapters, grads, moments, EMA
    check("LoRA (default + old) + grads + AdamW + EMA, bf16", predicted, got.net)


@pytest.mark.parametrize("micro", [0, 2])
def test_kv_held_by_the_rollout(micro):
    """K/V bytes the rollout reports per phase against the planner's frames, toy geometry
    (sink 3, window 9, resident 24, P = 2 blocks) on a tiny model: forks at 9 (a prompt switch
    in the continuation) and 15 (the switch at the fork)."""
    from kvpo.method.routing import plan_routing

    cfg = load_config(None, [f"row_micro_batch={micro}"])
    shape = tiny_config(
        num_layers=1, num_attention_heads=1, attention_head_dim=8, latent_height=8,
        latent_width=8, text_dim=8, ffn_dim=16,
    )  # fmt: skip
    video, built, _ = _tiny_stream(cfg, shape)
    page = shape.kv_bytes_per_frame(4)
    forks = set()
    for plan, ro in _fork_rollouts(cfg, video, built.result, plan_routing):
        forks.add(plan.start_frame)
        predicted = kv_held_frames(cfg, cfg.rows_per_batch, plan.start_frame)
        for phase in ("prefix", "window", "continuation"):
            check(
                f"K/V held, {phase}, fork {plan.start_frame}, {cfg.rows_per_batch} rows",
                predicted[phase] * page, ro.kv_bytes[phase],
            )  # fmt: skip
    assert forks == {9, 15}


def _tiny_stream(cfg, shape=None):
    """A streaming generator of ``cfg`` on a tiny one-head model (shape ``shape``)."""
    from kvpo.streaming import stream_from_config
    from kvpo.video_model import VideoModel

    shape = shape or tiny_config(
        num_layers=2, num_attention_heads=1, attention_head_dim=8, latent_height=8,
        latent_width=8, text_dim=8, ffn_dim=16,
    )  # fmt: skip
    torch.manual_seed(2)
    model = CausalWan.from_config(shape)

    def encode(prompts):
        return model.encode_text(torch.randn(len(prompts), 4, 8))

    video = VideoModel(model, encode, None, lambda f: f, (shape.in_channels, 8, 8))
    built = measure(lambda: stream_from_config(video, cfg, cfg.rows_per_batch))
    return video, built, shape


def _fork_rollouts(cfg, video, stream, planner):
    """Yields ``(plan, rollout)`` for ``planner``'s plans of steps 0 and 2 (seed 1), each group
    rolled out by ``stream`` in micro-batches of ``cfg.row_micro_batch`` rows and its fork
    snapshot freed."""
    from kvpo.method.rollout import rollout_group

    for step in (0, 2):
        plan = planner(
            cfg.routing_geometry(), cfg.chunks(), cfg.K, seed=1, step=step,
            within_first_x_chunks=cfg.perturb_within_first_x_chunks,
        )  # fmt: skip
        texts = [video.encode(["a"]) for _ in range(len(cfg.switch_frames) + 1)]
        ro = rollout_group(
            stream, texts, plan, stream.noise(5), policy_frames=plan.geometry.window_frames,
            end_frame=cfg.streaming_max_length, row_batch=cfg.row_micro_batch,
        )  # fmt: skip
        stream.cache.free([ro.snapshot])
        yield plan, ro


MEMFLOW_TOY = ["routing_rule=memflow", "model_kwargs.bank_size=2", "model_kwargs.record_interval=1"]


@pytest.mark.parametrize("micro", [0, 2])
def test_memflow_bank_pool_and_kv_held(micro):
    """MemFlow's bank on the toy geometry (bank 2 frames a layer, every block records): the
    pool the generator allocates has the bank's pages (2 layers: at most 2 (2 - 1) + 1 kept and
    the pending one, over 8 records: 4 a row, plus one per recorded block: 2), and the rollout's
    K/V stays under the planner's bound, above the bound without the bank."""
    from kvpo.method.routing_memflow import plan_memflow

    cfg = load_config(None, [f"row_micro_batch={micro}", *MEMFLOW_TOY])
    video, built, shape = _tiny_stream(cfg)
    stream, rows = built.result, cfg.rows_per_batch
    page = shape.kv_bytes_per_frame(4)
    # StreamingGenerator.pages_for, written out: sink + window + 2 F per row over a 24-frame
    # cache (resident 24 + F for the snapshot; 6 policy frames + 9 recache + F per row)
    bank = 4 + 6 // 3
    expected = 24 + 3 + rows * (max(6, 9) + 9 + 3) + bank * (rows + 1)
    assert bank_pages(cfg, shape) == 4 and pool_pages(cfg, rows, shape) == expected
    check(f"K/V pool with MemFlow's bank, {rows} rows", expected * page, built.net)
    assert start_frames(cfg) == [9, 15]  # start >= local 9, min(start, 24) - 4 >= 5 slots
    for plan, ro in _fork_rollouts(cfg, video, stream, plan_memflow):
        bound = kv_held_frames(cfg, rows, plan.start_frame, bank_pages(cfg, shape))
        without = kv_held_frames(cfg, rows, plan.start_frame)
        for phase in ("prefix", "window", "continuation"):
            held = ro.kv_bytes[phase]
            MEASURED.append(
                f"K/V held with the bank, {phase}, fork {plan.start_frame}, {rows} rows: bound "
                f"{bound[phase] * page:,} measured {held:,} (without the bank "
                f"{without[phase] * page:,})"
            )
            print(MEASURED[-1])
            assert held <= bound[phase] * page <= expected * page
        assert ro.kv_bytes["continuation"] > without["continuation"] * page


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recache_pass_peak(wide, dtype):
    """A recache of every frame before a switch at 27 (``recache_size=-1``) runs passes of 21
    and 6 frames (``pass_frames``: 21); its peak is the no-grad forward of the 21-frame pass."""
    from kvpo.models.prompt_switch import pass_ranges, recache

    model, text = wide[dtype]
    policy = CachePolicy(
        sink_size=1, local_attn_size=6, resident_frames=-1, frames_per_block=F, recache_size=-1
    )
    cache = FrameCache.create(model.config, policy, 64, dtype=model.dtype)
    ids = cache.new_rows(ROWS)
    with torch.no_grad():
        for s in range(0, 27, F):
            model.write_context(_latents(model), text, s, cache.view(ids, s, F, write=True))
    latents = torch.randn(ROWS, 16, 27, 8, 16).to(model.dtype)
    got = measure(lambda: recache(model, cache, ids, latents, text, 27))
    assert pass_ranges(policy, 27) == [(0, 21), (21, 27)]
    fwd = ForwardModel(WIDE, latents.element_size(), RANK)
    check(f"recache pass of {ROWS} rows x 21 frames {dtype}", fwd.nograd_peak(ROWS, 21), got.peak)


@pytest.fixture(scope="module")
def anchor_rollout(wide):
    """A toy-geometry rollout (K = 2, fork 9) of the wide bf16 model and try_kl's reference
    replay of its anchor (2 blocks: P = 2); prompts of 8 tokens (the activations dominate)."""
    from kvpo.method.anchor_kl import AnchorKL
    from kvpo.method.rollout import rollout_group
    from kvpo.method.routing import plan_routing
    from kvpo.streaming import group_seed, stream_from_config
    from kvpo.video_model import VideoModel

    model, _ = wide[torch.bfloat16]
    prompt = torch.randn(1, 8, WIDE.text_dim).to(torch.bfloat16)
    video = VideoModel(
        model, lambda p: model.encode_text(prompt.expand(len(p), -1, -1)), None, lambda f: f,
        (16, WIDE.latent_height, WIDE.latent_width),
    )  # fmt: skip
    cfg = load_config(None, ["K=2", "kl_loss_mode=try_kl", f"adapter.rank={RANK}"])
    stream = stream_from_config(video, cfg, cfg.rows_per_batch)
    plan = plan_routing(
        cfg.routing_geometry(), cfg.chunks(), cfg.K, seed=1, step=0,
        within_first_x_chunks=cfg.perturb_within_first_x_chunks,
    )  # fmt: skip
    prompts = ["a", "b", "c"]
    ro = rollout_group(
        stream, stream.segment_texts(prompts), plan, stream.noise(group_seed(cfg.seed, 0, 0)),
        policy_frames=cfg.policy_frames(plan), end_frame=cfg.streaming_max_length,
    )  # fmt: skip
    anchor = AnchorKL.from_config(cfg, stream, None)
    return cfg, anchor, ro, prompts, anchor.reference(ro, prompts, 0, 0)


@pytest.mark.parametrize("ckpt, steps", [(False, 1), (True, 2)], ids=["plain-1", "ckpt-2"])
def test_try_kl_anchor_replay_peak(wide, anchor_rollout, ckpt, steps):
    """try_kl's grad replay of the anchor and its backward against the planner's phase: the
    lines it adds beyond the step's data and the reference's x0 (which exist before), plus the
    LoRA gradients of the last layer back-propagated (as in the replay's test)."""
    model, _ = wide[torch.bfloat16]
    cfg, anchor, ro, prompts, ref = anchor_rollout
    cfg = dataclasses.replace(cfg, gradient_checkpointing=ckpt, anchor_grad_steps=steps)
    anchor.grad_steps, model.gradient_checkpointing = steps, ckpt
    assert (anchor.blocks, len(ro.policy_starts), ro.fork) == (2, 2, 9)

    def penalty():
        anchor.penalty(ro, prompts, ref, True)[0].backward()

    try:
        got = measure(penalty)
    finally:
        model.gradient_checkpointing = False
        for p in model.parameters():
            p.grad = None
    setup = Setup(WIDE, "bfloat16", "cpu", False, 8)
    phase = next(p for p in plan_memory(cfg, setup, 0).phases if p.name == "try_kl anchor replay")
    before = ("rollout latents (all rows)", "recorded z, u", "try_kl: the reference's x0")
    added = sum(line.bytes for line in phase.lines if not line.what.startswith(before))
    # the oracle of the lines: 2 blocks x steps calls of one row, 4 x0 per block, 3 prompts
    fwd, out = ForwardModel(WIDE, 2, RANK, text_len=8), 1 * 16 * F * 8 * 16 * 2
    calls = 2 * steps
    oracle = (
        fwd.text_bytes(3, grad=True) + 2 * 4 * out + calls * (fwd.saved(1, F, ckpt) + out)
        + calls * out + fwd.backward_working_set(1, F, ckpt)
    )  # fmt: skip
    assert added == oracle
    layer_grads = lora_parameters(WIDE, RANK) * 2 // WIDE.num_layers
    check(f"try_kl anchor replay + backward, ckpt={ckpt}, {steps} grad steps",
          added + layer_grads, got.peak)  # fmt: skip
