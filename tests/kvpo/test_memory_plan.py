"""The memory planner (kvpo.planning) against the allocator, on the CPU, at reduced sizes.

Activations are measured on the real Wan2.1-1.3B layer shape (dim 1536, 12 x 128 heads, FFN
8960, LoRA on every block linear) with 2 layers and a small latent frame; K/V on a tiny model
with the toy run's cache geometry; parameter counts against the modules built on the meta
device. Every prediction must be within 10% of its measurement (docs/memory.md lists them).
The choice of ``row_micro_batch`` is checked on limits just above / below computed peaks.
"""

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch

from benchmarks.harness import AllocationPeak
from kvpo.models import CachePolicy, CausalWan, FrameCache, tiny_config
from kvpo.models.causal_wan import cast_transformer
from kvpo.models.config import WAN_1_3B, WanConfig
from kvpo.models.lora import add_lora, freeze_copy
from kvpo.planning import choose_row_micro_batch, parse_size, plan_memory, usable_bytes
from kvpo.planning.activations import ForwardModel
from kvpo.planning.choose import CONTEXT_BYTES, FRAGMENTATION, start_config
from kvpo.planning.components import lora_parameters, transformer_bytes
from kvpo.planning.externals import Setup
from kvpo.planning.kv import bank_pages, kv_held_frames, pool_pages, start_frames
from kvpo.planning.sizes import SizeError
from kvpo.training.config_parse import load_config, resolved_dtype
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
    from kvpo.method.rollout import rollout_group
    from kvpo.method.routing import plan_routing
    from kvpo.streaming import stream_from_config
    from kvpo.video_model import VideoModel

    cfg = load_config(None, [f"row_micro_batch={micro}"])
    shape = tiny_config(
        num_layers=1, num_attention_heads=1, attention_head_dim=8, latent_height=8,
        latent_width=8, text_dim=8, ffn_dim=16,
    )  # fmt: skip
    torch.manual_seed(2)
    model = CausalWan.from_config(shape)

    def encode(prompts):
        return model.encode_text(torch.randn(len(prompts), 4, 8))

    video = VideoModel(model, encode, None, lambda f: f, (shape.in_channels, 8, 8))
    stream = stream_from_config(video, cfg, cfg.rows_per_batch)
    page = shape.kv_bytes_per_frame(4)
    forks = set()
    for step in (0, 2):
        plan = plan_routing(
            cfg.routing_geometry(), cfg.chunks(), cfg.K, seed=1, step=step,
            within_first_x_chunks=cfg.perturb_within_first_x_chunks,
        )  # fmt: skip
        texts = [video.encode(["a"]) for _ in range(len(cfg.switch_frames) + 1)]
        ro = rollout_group(
            stream, texts, plan, stream.noise(5), policy_frames=plan.geometry.window_frames,
            end_frame=cfg.streaming_max_length, row_batch=micro,
        )  # fmt: skip
        stream.cache.free([ro.snapshot])
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


MEMFLOW_TOY = ["routing_rule=memflow", "model_kwargs.bank_size=2", "model_kwargs.record_interval=1"]


@pytest.mark.parametrize("micro", [0, 2])
def test_memflow_bank_pool_and_kv_held(micro):
    """MemFlow's bank on the toy geometry (bank 2 frames a layer, every block records): the
    pool the generator allocates has the bank's pages (2 layers: at most 2 (2 - 1) + 1 kept and
    the pending one, over 8 records: 4 a row, plus one per recorded block: 2), and the rollout's
    K/V stays under the planner's bound, above the bound without the bank."""
    from kvpo.method.rollout import rollout_group
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
    for step in (0, 2):
        plan = plan_memflow(
            cfg.routing_geometry(), cfg.chunks(), cfg.K, seed=1, step=step,
            within_first_x_chunks=cfg.perturb_within_first_x_chunks,
        )  # fmt: skip
        texts = [video.encode(["a"]) for _ in range(len(cfg.switch_frames) + 1)]
        ro = rollout_group(
            stream, texts, plan, stream.noise(5), policy_frames=plan.geometry.window_frames,
            end_frame=cfg.streaming_max_length, row_batch=micro,
        )  # fmt: skip
        stream.cache.free([ro.snapshot])
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


def test_parameter_counts_match_the_modules():
    from transformers import Qwen2VLConfig, Qwen2VLModel, UMT5Config, UMT5EncoderModel

    from kvpo.planning.components import (
        QWEN2_VL_2B,
        QWEN2_VL_7B,
        qwen2vl_parameters,
        umt5_encoder_parameters,
    )

    def count(module_fn):
        with torch.device("meta"):
            return sum(p.numel() for p in module_fn().parameters())

    umt5 = UMT5Config(
        vocab_size=256384, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
        feed_forward_proj="gated-gelu",
    )  # fmt: skip
    assert umt5_encoder_parameters() == count(lambda: UMT5EncoderModel(umt5)) == 5_680_910_336
    for shape, expected in ((QWEN2_VL_7B, 7_746_378_240), (QWEN2_VL_2B, 2_208_985_600)):
        text = {k: getattr(shape, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")}  # fmt: skip
        vision = dict(depth=32, embed_dim=1280, hidden_size=shape.hidden_size, num_heads=16)
        config = Qwen2VLConfig(text_config=text, vision_config=vision)
        assert qwen2vl_parameters(shape) == count(lambda c=config: Qwen2VLModel(c)) == expected
    with torch.device("meta"):
        model = CausalWan.from_config(WAN_1_3B, device="meta")
        add_lora(model, 256)
    lora = sum(p.numel() for n, p in model.transformer.named_parameters() if ".lora_" in n)
    assert lora == lora_parameters(WAN_1_3B, 256) == 349_962_240


# ---------------------------------------------------------------------- the choice
@pytest.fixture(scope="module")
def longlive():
    cfg = load_config("configs/longlive.yaml", ["row_micro_batch=0"])
    return cfg, Setup(WAN_1_3B, "bfloat16", "cuda", True, 512, "Wan2.1-T2V-1.3B")


def _total_for(usable: int) -> int:
    """The smallest device size whose usable bytes reach ``usable``."""
    total = int(usable / (1 - FRAGMENTATION)) + CONTEXT_BYTES
    while usable_bytes(total) < usable:
        total += 1
    while usable_bytes(total - 1) >= usable:
        total -= 1
    return total


@pytest.mark.parametrize("value", [0, 5, 1])
def test_choice_at_the_edge_of_a_peak(longlive, value):
    cfg, setup = longlive
    peak = plan_memory(cfg, setup, value).peak[1]
    at = choose_row_micro_batch(cfg, _total_for(peak), setup)
    assert at.fits and at.row_micro_batch == value and at.plan.peak[1] == peak
    below = choose_row_micro_batch(cfg, _total_for(peak) - 1, setup, explain=False)
    expected = {0: 8, 5: 4, 1: 1}[value]
    assert below.row_micro_batch == expected and below.fits == (value != 1)


def test_what_does_not_fit_and_which_option_would(longlive):
    cfg, setup = longlive
    plain = dataclasses.replace(cfg, gradient_checkpointing=False)
    with_ckpt = plan_memory(cfg, setup, 1)
    without = plan_memory(plain, setup, 1)
    assert without.peak[0] == "replay_grad" and without.peak[1] > with_ckpt.peak[1]
    choice = choose_row_micro_batch(plain, _total_for(with_ckpt.peak[1]), setup)
    assert not choice.fits and "even one row peaks" in choice.message
    assert [name for name, _ in choice.over] == ["replay_grad"]
    assert choice.options[0].startswith("gradient_checkpointing=true: fits at row_micro_batch=1")
    hopeless = choose_row_micro_batch(cfg, parse_size("80GiB"), setup)
    assert not hopeless.fits and "rewards: score" in hopeless.message
    assert hopeless.options[0].startswith("reward_offload=true: still does not fit")
    assert hopeless.options[-1].startswith("no configuration option makes it fit")
    assert "decoded videos of this step (fp32) 23.50 GiB" in hopeless.options[-1]


def test_recache_bank_and_try_kl_at_the_papers_settings(longlive):
    """At Wan-1.3B scale: the switch recache (12 frames, one pass) is the rollout's transient;
    MemFlow's pool has 18 bank pages a row plus 6 for the policy blocks; try_kl adds its phase."""
    cfg, setup = longlive
    plan = plan_memory(cfg, setup, 5)
    line = plan.phases[0].lines[-1]
    tokens = 5 * 12 * 1560
    peak = 2 * tokens * (3 * 8960 + 8 * 1536) + 5 * 12 * 6 * 1536 * 4 + 2 * 12 * 1560 * 128 * 4
    assert line.what == "recache pass at a switch, 5 rows x 12 frames" and line.bytes == peak
    assert "try_kl anchor replay" not in [p.name for p in plan.phases]
    try_kl = dataclasses.replace(cfg, kl_loss_mode="try_kl")
    anchor = next(p for p in plan_memory(try_kl, setup, 5).phases if p.name.startswith("try_kl"))
    saved = next(line for line in anchor.lines if line.what.startswith("saved activations"))
    assert saved.what.endswith("5 calls x 1 row")  # P = 5 blocks x anchor_grad_steps 1
    memflow = load_config("configs/memflow.yaml", ["row_micro_batch=0"])
    # 147 frames, a record every 9: 17 records (under 30 x (3 - 1) + 1) and the pending one
    assert bank_pages(memflow, WAN_1_3B) == 18
    for rows in (1, 5):  # resident 33 + F, per row 18 policy + 12 recache + F, bank 18 + 6
        pages = 33 + 3 + rows * (18 + 12 + 3) + (18 + 6) * (rows + 1)
        assert pool_pages(memflow, rows, WAN_1_3B) == pages
        pool = plan_memory(memflow, setup, rows).resident[5]
        assert pool.what.startswith("K/V page pool")
        assert pool.bytes == pages * 2 * 30 * 1560 * 1536 * 2  # K and V of 30 layers, bf16


def test_reward_models_by_name(longlive):
    from kvpo.planning.externals import reward_footprint

    cfg, setup = longlive
    hps = reward_footprint(cfg, setup)
    assert hps.weights == 7_746_378_240 * 2 + 4 * (3584 * 1024 + 1024 + 1024 * 16 + 16 + 34)
    align = reward_footprint(dataclasses.replace(cfg, reward_model="videoalign_mq"), setup)
    assert align.weights == 2_208_985_600 * 2 + 1536 * 2
    served = reward_footprint(
        dataclasses.replace(cfg, reward_model="http://127.0.0.1:8765/x"), setup
    )
    assert served.weights == 0 and not served.notes
    mine = dataclasses.replace(cfg, reward_model="mypkg.scorers:Aesthetic")
    assert reward_footprint(mine, setup).weights == 0
    assert (
        "'mypkg.scorers:Aesthetic' is not known to the planner" in plan_memory(mine, setup).notes[0]
    )


def test_sizes_and_the_command(capsys):
    from kvpo.cli import main as kvpo_main

    assert parse_size("80GiB") == 80 * 2**30 and parse_size("141GB") == 141 * 10**9
    assert parse_size("1.5 TiB") == int(1.5 * 2**40) and parse_size("4096") == 4096
    for bad, message in (("80XB", "unknown memory unit 'XB'"), ("lots", "cannot read"),
                         ("0GiB", "must be positive")):  # fmt: skip
        with pytest.raises(SizeError, match=message):
            parse_size(bad)
    assert kvpo_main(["plan", "--config", "configs/longlive.yaml", "--gpu-memory", "80XB"]) == 2
    assert "unknown memory unit 'XB'" in capsys.readouterr().err
    assert kvpo_main(["plan", "--gpu-memory", "8GiB", "K=4"]) == 0  # the toy run fits
    out = capsys.readouterr().out
    assert "choice: row_micro_batch=0 (all rows at once)" in out and "replay_grad" in out
    assert kvpo_main(["plan", "--gpu-memory", "80GiB", "row_micro_batch=-1"]) == 2
    assert "row_micro_batch must be an integer >= 0 or 'auto'" in capsys.readouterr().err


def test_auto_values_at_start(capsys):
    from kvpo.training.validation import validate

    cfg = load_config(None, ["row_micro_batch=auto"])
    assert (
        cfg.row_micro_batch == "auto"
        and load_config(None, ["row_micro_batch=3"]).row_micro_batch == 3
    )
    validate(cfg)
    lines = []
    resolved = start_config(cfg, "cpu", log=lines.append)
    assert resolved.row_micro_batch == 0 and len(lines) == 1 and "all 9 rows" in lines[0]
    assert cfg.rows_per_batch == 9  # auto on this CPU-only machine
    wan = dataclasses.replace(cfg, generator_ckpt="/no/such/model.pt")
    assert resolved_dtype(cfg, "cuda") == "float32" and resolved_dtype(cfg, "cpu") == "float32"
    assert resolved_dtype(wan, "cuda") == "bfloat16" and resolved_dtype(wan, "cpu") == "float32"
    assert resolved_dtype(dataclasses.replace(wan, dtype="float16"), "cuda") == "float16"
    lines = []
    start_config(dataclasses.replace(cfg, row_micro_batch=2), "cuda", log=lines.append)
    assert lines == [
        "dtype float32 on a GPU: routed attention runs in IEEE fp32, without tensor cores "
        "(dtype=bfloat16, or auto for a Wan checkpoint)"
    ]
