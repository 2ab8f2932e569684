"""Peak device memory of one training step, per phase, for one ``row_micro_batch``.

A phase's peak is what stays resident for the whole run (weights, adapters, optimiser state,
the K/V page pool, the previous step's decoded videos, ...) plus the step's data plus what the
phase itself allocates at its worst moment. Every line carries its *basis*:

- ``derived``: counted from shapes and the code's allocation pattern (exact up to small
  tensors; the activation counts are checked against the allocator by the tests);
- ``code``: a size the code sets (the page pool: ``StreamingGenerator.pages_for``);
- ``scaled``: measured on a CPU at a reduced size and scaled (the Wan VAE's decode);
- ``estimate``: a round figure, not derived (a reward backbone's activations).

The formulas are documented in ``docs/memory.md`` and :mod:`kvpo.planning.activations`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpo.planning.activations import ForwardModel
from kvpo.planning.components import lora_parameters, transformer_bytes
from kvpo.planning.externals import Setup, reward_footprint, text_encoder_bytes, vae_bytes
from kvpo.planning.kv import bank_pages, kv_held_frames, pool_pages, start_frames
from kvpo.planning.recache import largest_pass, pass_lengths
from kvpo.training.config import TrainConfig

VAE_DECODE_ELEMENTS_PER_PIXEL = 5300
"""Wan VAE decode working set per output pixel of one frame, in elements of the VAE's dtype:
measured on a CPU in fp32 at 64x64 and 128x128 pixels (20.4 - 21.1 KB per pixel, linear in the
pixel count, nearly flat in the number of frames), beyond the decoded video itself."""


@dataclass(frozen=True)
class Line:
    """One memory consumer: ``what``, its bytes, its basis (module docstring), a note."""

    what: str
    bytes: int
    basis: str = "derived"
    note: str = ""


@dataclass
class Phase:
    """The lines a phase adds to the resident set at its worst moment."""

    name: str
    lines: list[Line]

    @property
    def bytes(self) -> int:
        return sum(line.bytes for line in self.lines)


@dataclass
class MemoryPlan:
    """The predicted memory of one training step at ``row_micro_batch`` (0: all rows)."""

    row_micro_batch: int
    rows: int
    resident: list[Line]
    phases: list[Phase]
    kv_held: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        return sum(line.bytes for line in self.resident)

    def total(self, phase: Phase) -> int:
        return self.resident_bytes + phase.bytes

    @property
    def peak(self) -> tuple[str, int]:
        """``(phase name, bytes)`` of the largest phase."""
        worst = max(self.phases, key=self.total)
        return worst.name, self.total(worst)


# ---------------------------------------------------------------------- the plan
def plan_memory(cfg: TrainConfig, setup: Setup, row_micro_batch: int | None = None) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``cfg`` on ``setup`` at ``row_micro_batch`` (default: the
    config's own value; 0 = all ``G + 1`` rows)."""
    rmb = cfg.row_micro_batch if row_micro_batch is None else row_micro_batch
    if not isinstance(rmb, int):
        raise ValueError(f"plan_memory needs an integer row_micro_batch, got {rmb!r}")
    G, model, e = cfg.K, setup.model, setup.element_size
    rows = min(rmb or G + 1, G + 1)
    fwd = ForwardModel(model, e, cfg.adapter.rank, _targets(cfg), setup.text_len)
    F, S = cfg.num_frame_per_block, len(cfg.denoising_step_list)
    blocks = cfg.policy_frames() // F  # the most energy blocks of a rollout
    page = model.kv_bytes_per_frame(e)
    reward = reward_footprint(cfg, setup)
    video = setup.video(cfg.streaming_max_length)  # one decoded video, elements
    notes = list(setup.notes) + list(reward.notes)

    lora = lora_parameters(model, cfg.adapter.rank, _targets(cfg))
    # frozen copies (kvpo.training.adapters): the old policy, and the initial LoRA of a run
    # continuing lora_ckpt whose KL reference is the initial policy
    initial = cfg.lora_ckpt is not None and cfg.lora_init == "continue" and cfg.kl_reference_initial
    frozen = "old + initial copies" if initial else "old copy"
    resident = [
        Line("transformer weights", transformer_bytes(model, e), note=setup.model_note),
        Line(
            f"LoRA adapters: trained + frozen {frozen}",
            (2 + initial) * lora * e,
            note=f"{lora:,} each",
        ),  # fmt: skip
        Line("LoRA gradients", lora * e),
        Line("AdamW moments (2 per parameter)", 2 * lora * e),
    ]
    if cfg.ema_decay > 0:
        resident.append(Line("EMA of the adapter (fp32)", lora * 4))
    pages = pool_pages(cfg, rows, model)
    bank = bank_pages(cfg, model)
    pool_note = f"{pages} pages x {page / 2**20:.1f} MiB"
    if bank:
        pool_note += f", MemFlow's bank: up to {bank} pages a row"
    resident.append(Line("K/V page pool (preallocated)", pages * page, "code", pool_note))
    if setup.wan:
        resident.append(Line("text encoder umT5-XXL", text_encoder_bytes(e)))
        resident.append(Line("VAE weights", vae_bytes(e)))
    if reward.weights and not cfg.reward_offload:
        resident.append(Line(f"reward model {cfg.reward_model}", reward.weights, note=reward.what))

    forks = start_frames(cfg) or [cfg.model_kwargs.local_attn_size]
    segments = len(cfg.switch_frames) + 1
    latent = model.in_channels * model.latent_height * model.latent_width * e  # per frame
    videos = (G + 1) * cfg.streaming_max_length * latent
    step_data = [
        Line("rollout latents (all rows)", videos),
        Line("recorded z, u of the policy blocks", 2 * G * blocks * S * F * latent),
    ]
    text = Line("prompt contexts (no grad)", fwd.text_bytes(segments, grad=False))
    joined = Line("rollout latents: the rows' parts before torch.cat", videos)
    # the fork snapshot's own recache at a switch at the fork (one row)
    at_fork = max(pass_lengths(cfg, [f for f in forks if f in cfg.switch_frames]), default=0)
    rollout = max(
        (_nograd(fwd, rows, F), _recache(fwd, rows, largest_pass(cfg, forks)),
         _recache(fwd, 1, at_fork)), key=lambda line: line.bytes,
    )  # fmt: skip
    phases = [Phase("rollout", step_data + [joined, text, rollout])]
    phases += _reward_phases(cfg, setup, reward, step_data, video)
    replay_rows = min(rows, G)
    in_replay = largest_pass(cfg, forks, blocks * F)
    preds = 2 * blocks * S * fwd.output_bytes(replay_rows, F)
    transient = max(_nograd(fwd, replay_rows, F), _recache(fwd, replay_rows, in_replay),
                    key=lambda line: line.bytes)  # fmt: skip
    phases.append(
        Phase(
            "replay_old / replay_ref",
            step_data + [text, Line("replay predictions", preds), transient],
        )  # fmt: skip
    )
    grad_rows = min(rmb or G, G)  # Learner.policy_gradients' chunk
    phases.append(_grad_phase(cfg, fwd, step_data, segments, blocks, grad_rows, in_replay))
    anchor = _try_kl_phase(cfg, fwd, step_data, segments, blocks)
    phases += [anchor] if anchor else []
    phases.append(
        Phase("update", [Line("AdamW step (foreach): sqrt of the 2nd moments", lora * e,
                              note="CUDA's multi-tensor AdamW; the CPU's loop allocates less")])
    )  # fmt: skip

    per_fork = [kv_held_frames(cfg, rows, f, bank) for f in forks]
    held = {k: max(h[k] for h in per_fork) * page for k in per_fork[0]}  # the worst fork
    if max(held.values()) > pages * page:
        notes.append(
            f"the K/V held at its peak ({max(held.values()) // page} frames) exceeds the pool "
            f"({pages} pages)"
        )
    return MemoryPlan(rmb, rows, resident, phases, held, notes)


def _targets(cfg: TrainConfig) -> tuple[str, ...] | None:
    return tuple(cfg.adapter.target_modules) or None


def _nograd(fwd: ForwardModel, rows: int, frames: int) -> Line:
    return Line(
        f"no-grad forward, {rows} rows x {frames} frames", fwd.nograd_peak(rows, frames),
        note=f"{fwd.tokens(rows, frames):,} tokens",
    )  # fmt: skip


def _recache(fwd: ForwardModel, rows: int, frames: int) -> Line:
    """The no-grad forward of the largest recache pass (``frames`` 0: none, 0 bytes)."""
    return Line(
        f"recache pass at a switch, {rows} rows x {frames} frames",
        fwd.nograd_peak(rows, frames) if frames else 0,
        note=f"{fwd.tokens(rows, frames):,} tokens, no grad",
    )  # fmt: skip


def _grad_phase(cfg, fwd: ForwardModel, step_data, segments, blocks, g, in_replay) -> Phase:
    """The grad replay of ``g`` rows at the backward of its last call; when a switch falls in
    its blocks, the larger of that and its no-grad pass's recache (before any grad call)."""
    F, S = cfg.num_frame_per_block, len(cfg.denoising_step_list)
    ckpt = cfg.gradient_checkpointing
    calls = blocks * cfg.log_prob_grad_steps
    lines = list(step_data) + _anchor_reference(cfg, fwd, blocks)
    lines.append(Line("prompt contexts (with grad)", fwd.text_bytes(segments, grad=True)))
    lines.append(Line("replay predictions", 2 * blocks * S * fwd.output_bytes(g, F)))
    recache = _recache(fwd, g, in_replay)
    if calls == 0:
        return Phase("replay_grad", lines + [recache] * bool(in_replay))
    per_call = fwd.saved(g, F, ckpt) + fwd.output_bytes(g, F)
    how = "with" if ckpt else "without"
    grad = [
        Line(
            f"saved activations {how} checkpointing: {calls} calls x {g} rows",
            calls * per_call,
            note=f"{blocks} blocks x log_prob_grad_steps {cfg.log_prob_grad_steps}",
        ),  # fmt: skip
        Line("backward working set (one call)", fwd.backward_working_set(g, F, ckpt)),
    ]
    if recache.bytes > sum(line.bytes for line in grad):
        return Phase("replay_grad", lines + [recache])
    return Phase("replay_grad", lines + grad)


def _anchor_blocks(cfg: TrainConfig, blocks: int) -> int:
    """try_kl's anchor blocks (``AnchorKL``: ``min(perturb_num_blocks, policy blocks)``); 0
    when the penalty is off (``AnchorKL.from_config``)."""
    if cfg.kl_loss_mode != "try_kl" or cfg.kl_coef == 0:
        return 0
    return min(cfg.perturb_num_blocks, blocks)


def _anchor_reference(cfg, fwd: ForwardModel, blocks: int) -> list[Line]:
    """try_kl: the reference's ``n S`` x0 of the anchor, kept from the reference replay to the
    penalty (``AnchorReference.x0``)."""
    n, S = _anchor_blocks(cfg, blocks), len(cfg.denoising_step_list)
    if not n:
        return []
    out = n * S * fwd.output_bytes(1, cfg.num_frame_per_block)
    return [Line("try_kl: the reference's x0 of the anchor", out)]


def _try_kl_phase(cfg, fwd: ForwardModel, step_data, segments, blocks) -> Phase | None:
    """try_kl's grad replay of the anchor (one row, ``n`` blocks, ``anchor_grad_steps`` grad
    calls each; after the replays' backward), at the backward of its last call
    (:func:`kvpo.method.anchor_kl.anchor_predictions`): every call's saved activations and
    velocity, the x0 of every step (``n S``), the next step's input of each grad step, one
    call's backward working set. Its no-grad pass (and recache) is that of the grad replay
    with one row."""
    n, F, S = _anchor_blocks(cfg, blocks), cfg.num_frame_per_block, len(cfg.denoising_step_list)
    if not n:
        return None
    k, ckpt, out = cfg.anchor_grad_steps, cfg.gradient_checkpointing, fwd.output_bytes(1, F)
    how = "with" if ckpt else "without"
    lines = (
        list(step_data)
        + _anchor_reference(cfg, fwd, blocks)
        + [
            Line("prompt contexts (with grad)", fwd.text_bytes(segments, grad=True)),
            Line("anchor x0 predictions", n * S * out),
            Line(
                f"saved activations {how} checkpointing: {n * k} calls x 1 row",
                n * k * (fwd.saved(1, F, ckpt) + out),
                note=f"{n} blocks x anchor_grad_steps {k}",
            ),  # fmt: skip
            Line("next inputs of the grad steps", n * min(k, S - 1) * out),
            Line("backward working set (one call)", fwd.backward_working_set(1, F, ckpt)),
        ]
    )
    return Phase("try_kl anchor replay", lines)


def _reward_phases(cfg, setup: Setup, reward, step_data, video: int) -> list[Phase]:
    """Decoding all rows, then scoring them."""
    G, e = cfg.K, setup.element_size
    rows = G + 1
    if setup.wan:
        ws = VAE_DECODE_ELEMENTS_PER_PIXEL * setup.pixels * e + 2 * video * e
        decode = [
            Line("decoded videos, fp32 output (all rows)", rows * video * 4,
                 note="kvpo.video_model: one video at a time into one fp32 tensor"),
            Line("VAE decode of one video (working set, or its output + fp32 conversion)",
                 max(ws, video * e + video * 4), "scaled"),
        ]  # fmt: skip
    else:
        decode = [Line("decoded videos, fp32 (toy: (x + 1) / 2, clamped)", 2 * rows * video * 4)]
    score = [Line("decoded videos of this step (fp32)", rows * video * 4)]
    if reward.weights and cfg.reward_offload:
        score.append(Line(f"reward model {cfg.reward_model} (offloaded between calls)",
                          reward.weights, note=reward.what))  # fmt: skip
    score += reward.working
    return [
        Phase("rewards: decode", step_data + decode),
        Phase("rewards: score", step_data + score),
    ]
