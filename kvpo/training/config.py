"""Trainer configuration: one dataclass, its allowed choices, and the typed views built from it.

Key names follow the LongLive / MemFlow KVPO YAML files (``K``, ``m_nearest_frames``,
``perturb_num_blocks``, ``model_kwargs.local_attn_size``, ``adapter.rank``, ...) where they mean
the same thing; the defaults are the built-in toy run (``python -m kvpo.train`` with no
arguments). A field's allowed values are declared with it (``choices``), listed by ``--help`` and
checked by :mod:`kvpo.training.validation`. The flat keys become the typed objects the method
uses in one place (:mod:`kvpo.training.config_views`): :meth:`TrainConfig.cache_policy`,
:meth:`~TrainConfig.schedule`, :meth:`~TrainConfig.routing_geometry`, :meth:`~TrainConfig.chunks`,
:meth:`~TrainConfig.policy_config`, :meth:`~TrainConfig.advantage_config`,
:meth:`~TrainConfig.exploration_config`, :meth:`~TrainConfig.latent_layout`. Reading files
and overrides: :mod:`kvpo.training.config_parse`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from kvpo.training.config_sections import (
    TOY_REWARDS,
    AdapterConfig,
    ConfigError,
    ModelKwargs,
    RewardComponent,
    _f,
)
from kvpo.training.config_views import TypedViews

__all__ = [
    "AdapterConfig", "ConfigError", "ModelKwargs", "RewardComponent", "TrainConfig",
    "parse_int_list",
]  # fmt: skip


@dataclass
class TrainConfig(TypedViews):
    """Everything ``python -m kvpo.train`` reads; ``--help`` lists each field."""

    # model and checkpoints
    generator_ckpt: str | None = _f(
        None,
        "base model: empty = the toy model shipped in kvpo/toy/weights, a toy-format directory, "
        "or a Wan checkpoint (diffusers dir, Self-Forcing/LongLive/MemFlow .pt/.safetensors)",
        "model",
    )
    lora_ckpt: str | None = _f(None, "LoRA weights to start from (peft or LongLive naming)")
    lora_ckpt_alpha: float | None = _f(
        None, "alpha of lora_ckpt (scale alpha / rank); empty = its rank, as LongLive and MemFlow"
    )
    lora_init: str = _f(
        "continue",
        "with lora_ckpt: 'continue' trains that LoRA (its rank/alpha must be adapter.*'s; KL "
        "reference: a frozen copy of it), as the KVPO authors; 'merge' adds it to the frozen base "
        "and trains a fresh adapter of adapter.rank on top (reference: adapters disabled)",
        choices=("continue", "merge"),
    )
    wan_model_path: str | None = _f(
        None,
        "Wan2.1 directory (diffusers layout: text_encoder/, tokenizer/, vae/) for a Wan "
        "generator_ckpt; local files only",
    )
    device: str = _f("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    dtype: str = _f(
        "auto",
        "compute dtype; 'auto': bfloat16 for a Wan checkpoint on CUDA, else float32 (toy, CPU)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    kernel_backend: str = _f(
        "auto", "kvpo_kernels backend", choices=("auto", "torch", "triton", "cpp")
    )
    cpu_threads: int = _f(
        0,
        "torch intra-op threads on CPU; 0 = torch's default (1 is faster on shared cores)",
    )
    denoising_step_list: list[int] = _f([1000, 750, 500, 250], "few-step sampler timesteps")
    warp_denoising_step: bool = _f(True, "map the timesteps through the shifted schedule")
    sampler_rule: str = _f(
        "euler",
        "'x0' (re-noise x0_hat: the distilled models) or 'euler' (the toy model's ODE)",
        choices=("x0", "euler"),
    )
    num_frame_per_block: int = _f(3, "latent frames generated per block")
    context_noise: int = _f(0, "timestep of the context pass that writes a block's K/V")
    context_add_noise: bool = _f(
        True,
        "the context pass reads (1 - sigma) x0 + sigma * noise, sigma from the authors' "
        "scheduler table at context_noise (0.00498 at shift 5); false: the clean x0",
    )
    recache_full_kv_cache_after_switch: bool = _f(
        False,
        "a prompt switch re-encodes all resident_frames frames (false: local_attn_size)",
    )
    recache_rule: str = _f(
        "longlive",
        "the prompt-switch recache: 'longlive' (passes of 21 frames) or 'memflow' (one pass, "
        "needs recache_full_kv_cache_after_switch false); both attend to the sink and the "
        "newest local_attn_size - sink_size frames (and the bank), unmasked",
        choices=("longlive", "memflow"),
    )
    model_kwargs: ModelKwargs = _f(ModelKwargs(), "cache geometry (see model_kwargs.*)")
    slice_last_frames: int = _f(
        15, "resident cache = local_attn_size + slice_last_frames frames (older frames to route)"
    )
    # video layout and prompts
    streaming_max_length: int = _f(24, "latent frames per training video", "video and prompts")
    streaming_chunk_size: int = _f(9, "frames of the first streaming chunk")
    streaming_min_new_frame: int = _f(6, "frames of every later chunk")
    switch_frame_indices: str = _f(
        "9, 15", "frames where the next prompt segment starts (comma separated)"
    )
    data_path: str | None = _f(None, "training prompt file (.txt or .jsonl); empty = toy prompts")
    eval_data_path: str | None = _f(
        None, "held-out prompt file; empty = the last eval_prompts of data_path, or the toy's"
    )
    prompt_min_segments: int = _f(0, "drop file prompt sequences with fewer segments; 0 = keep")
    prompt_max_segments: int = _f(0, "cut file prompt sequences to this many segments; 0 = no")
    prompt_order: str = _f(
        "sweep", "file prompts: 'sweep' in order, (rollout x world + rank) mod N (the authors'), "
        "or 'random' (seeded draw)", choices=("sweep", "random"),
    )  # fmt: skip
    # exploration
    K: int = _f(8, "G: routed branches per group (plus one unrouted anchor)", "exploration (CHR)")
    m_nearest_frames: int = _f(4, "nearest frames kept in every routed context (block included)")
    perturb_num_blocks: int = _f(2, "P: consecutive routed blocks")
    perturb_within_first_x_chunks: int = _f(7, "the routed window starts in these first chunks")
    routing_mode: str = _f(
        "dispersed",
        "'dispersed' (slices of one permutation, reference) or 'independent'",
        choices=("dispersed", "independent"),
    )
    routing_rule: str = _f(
        "longlive",
        "routed contexts: 'longlive' (sink ++ local_attn_size - sink - m routed frames ++ "
        "nearest) or 'memflow' (local_attn_size - m routed cache slots ++ nearest, no sink)",
        choices=("longlive", "memflow"),
    )
    exploration: str = _f(
        "kv_routing",
        "how branches differ: 'kv_routing' (KVPO), 'noise_injection' (the authors' noise "
        "baseline), 'initial_noise' (Neighbor GRPO / AR-CoPO) or 'kv_routing+noise' (both); "
        "docs/study.md",
        choices=("kv_routing", "noise_injection", "initial_noise", "kv_routing+noise"),
    )
    noise_injection_scale: float = _f(
        0.2,
        "noise_injection: std of the Gaussian noise each branch adds to its noisy latent before "
        "the steps noise_inject_at_steps of every fork-chunk block",
    )
    noise_inject_at_steps: list[int] = _f(
        [1, 2, 3], "noise_injection: denoising step indices (0 = the first model call)"
    )
    initial_noise_mix: float = _f(
        0.3, "initial_noise: s of the branch noise sqrt(1 - s^2) eps + s delta_g (fork chunk)"
    )
    row_micro_batch: int | str = _f(
        0, "rows (branches + anchor) per forward; 0 = all; 'auto' = the memory planner's choice"
    )
    # rewards and advantages
    reward_model: str = _f(
        "toy",
        "reward model: a registered name (kvpo.rewards registry: toy, video_hpsv3, videoalign, "
        "videoalign_vq|mq|mq_rgb|ta, motion_smoothness, dynamic_degree), an import path "
        "'pkg.module:Factory', or a reward server 'http://127.0.0.1:PORT/NAME'",
        "rewards",
    )
    reward_path: str = _f(
        "", "reward model weights: a file or directory in the released layout (docs/rewards.md)"
    )
    reward_base_model: str = _f(
        "", "Qwen2-VL base directory (config + tokenizer) of video_hpsv3 / videoalign*"
    )
    reward_batch_size: int = _f(
        0,
        "frames / videos / frame pairs per reward forward, or videos per reward-server request; "
        "0 = the scorer's default",
    )
    reward_offload: bool = _f(
        False, "keep the reward model on the CPU between calls, on the device only to score"
    )
    reward_videos_per_call: int = _f(
        0,
        "videos per reward-model call when scoring clips (the KVPO authors' reward_batch_size): "
        "the G + 1 videos of a group, or the held-out videos, go in calls of at most this many; "
        "0 = all in one call",
    )
    reward_components: list[RewardComponent] = _f(TOY_REWARDS, "weighted reward components")
    eval_reward_components: list[RewardComponent] = _f(
        [],
        "components scored by the held-out evaluation, with the weights of its total (names "
        "the reward model returns); empty = reward_components",
    )
    train_local: bool = _f(True, "use the local reward (the forked chunk)")
    local_reward_decode: str = _f(
        "chunk",
        "the local reward's clip: 'chunk' decodes the forked chunk's latents alone (the authors': "
        "18 latent frames -> 69 video frames) or 'slice' cuts it from the whole video's decode",
        choices=("chunk", "slice"),
    )
    train_global: bool = _f(True, "use the global reward (one clip per prompt segment)")
    long_reward_normal_clip_len: int = _f(
        0, "frames of each global per-segment clip, centred in the segment; 0 = whole segment"
    )
    long_reward_enable_transition: bool = _f(
        False,
        "the global reward also scores one clip centred at each prompt switch, with the KVPO "
        "authors' transition prompt (MemFlow's _build_postfork_clip_specs; their trainers build "
        "none)",
    )
    long_reward_transition_clip_len: int = _f(
        48, "decoded frames of each transition clip, centred at the switch (>= 1)"
    )
    long_reward_normal_weight: float = _f(
        1.0,
        "w_n: global = (w_n mean(segment clips) + w_t mean(transition clips)) / (w_n + w_t), "
        "w_t = 0 without transition clips (then w_n divides out; it must be > 0)",
    )
    long_reward_transition_weight: float = _f(0.5, "w_t: the transition clips' weight")
    advantage_mode: str = _f(
        "anchor", "'anchor' (KVPO) or 'grpo' (group mean)", choices=("anchor", "grpo")
    )
    advantage_fusion_mode: str = _f(
        "std", "per-signal scaling before fusion", choices=("std", "none", "zscore")
    )
    advantage_fusion_local_weight: float = _f(1.0, "weight of the local advantage")
    advantage_fusion_global_weight: float = _f(0.5, "weight of the global advantage")
    adv_clip_max: float = _f(2.5, "clip of the fused advantage (0 = off)")
    use_raw_weighted_reward_advantage: bool = _f(
        False,
        "one advantage per signal from the weighted raw rewards (else: the weighted sum "
        "of per-component advantages)",
    )
    # policy
    tau: float = _f(2.0, "temperature of the branch softmax: logit = -E / tau", "policy (TVE)")
    tve_step_weight: str = _f(
        "sigma2",
        "w_s of the energy: 'sigma2' (x0 MSE), 'uniform' or 'floored' (sigma^2 / max(sigma, "
        "tve_sigma_floor)^2)",
        choices=("sigma2", "uniform", "floored"),
    )
    tve_sigma_floor: float = _f(0.0, "the floor of tve_step_weight 'floored' (> 0)")
    log_prob_grad_steps: int = _f(2, "denoising steps replayed with gradient (the first ones)")
    energy_blocks: str = _f(
        "chunk",
        "blocks whose TVE forms pi: 'chunk' (every block of the fork chunk from the fork on) "
        "or 'routed' (the P routed blocks)",
        choices=("chunk", "routed"),
    )
    policy_window_frames: int = _f(0, "frames whose energy forms pi; 0 = energy_blocks' rule")
    clip_range_low: float = _f(0.1, "ratio clip below: 1 - clip_range_low")
    clip_range_high: float = _f(0.2, "ratio clip above: 1 + clip_range_high")
    log_ratio_clamp: float = _f(20.0, "clamp of the log ratio")
    kl_coef: float = _f(10.0, "coefficient of the KL-style penalty (kl_loss_mode)")
    kl_loss_mode: str = _f(
        "discrete_kl",
        "'discrete_kl': KL(pi_theta || pi_ref) over the branch softmax; 'try_kl': the anchor "
        "replayed from its noise under the current and the reference policy, mean x0 MSE",
        choices=("discrete_kl", "try_kl"),
    )
    kl_reference_initial: bool = _f(True, "KL reference: initial model (True) or old policy")
    anchor_grad_steps: int = _f(
        1, "try_kl: the first denoising steps of each anchor block that carry gradient"
    )
    gated_scale: float = _f(0.5, "loss scale s of a group where no branch beats the anchor")
    protect_mode: str = _f(
        "gate",
        "a group where no branch beats the anchor: 'gate' (loss scaled by gated_scale) or "
        "'skip' (zero loss; the update is skipped when no rank has a better branch)",
        choices=("gate", "skip"),
    )
    min_update_entropy_ratio: float = _f(
        0.0, "'gate': skip the update when the branch entropy > (1 - ratio) ln G (0 = off)"
    )
    ppo_epochs: int = _f(
        1, "updates per rollout: each epoch replays the same rollout with the old energies fixed"
    )
    gradient_checkpointing: bool = _f(False, "recompute grad-carrying replay forwards")
    # optimisation
    lr: float = _f(
        1e-4, "AdamW learning rate (method: 1e-5 at rank 256 on Wan-1.3B)", "optimisation"
    )
    lr_scheduler: str = _f(
        "constant_with_warmup",
        "diffusers' get_scheduler LR schedule, one step per training step; its step 0 skipped",
        choices=("constant", "constant_with_warmup", "cosine", "linear"),
    )
    lr_warmup_steps: int = _f(5, "warmup training steps W: step s (from 0) at lr * (s + 1) / W")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0 = off)")
    ema_decay: float = _f(0.999, "EMA of the trainable weights (0 = off)")
    sync_every: int = _f(
        2, "rollouts per training step (the reference's gradient_accumulation_steps), at whose "
        "end the old policy is re-synced and the LR schedule advanced; AdamW steps every rollout"
    )  # fmt: skip
    max_train_steps: int = _f(50, "training steps (x sync_every rollouts, one group per rank)")
    seed: int = _f(42, "base seed (per-rank and per-step seeds derive from it)")
    adapter: AdapterConfig = _f(AdapterConfig(), "LoRA adapter (see adapter.*)")
    max_consecutive_skips: int = _f(3, "stop after this many skipped (NaN/inf) steps in a row")
    # evaluation
    eval_before: bool = _f(True, "evaluate held-out prompts before training", "evaluation")
    eval_after: bool = _f(True, "evaluate held-out prompts after training")
    eval_prompts: int = _f(16, "held-out prompt sequences evaluated (0 = all)")
    eval_seeds: int = _f(2, "noise seeds per held-out prompt")
    eval_use_ema: bool = _f(False, "evaluate the EMA weights instead of the trained ones")
    eval_interval_steps: int = _f(0, "also evaluate every N steps (0 = never)")
    # output
    output_dir: str = _f("runs", "parent directory of run directories", "output")
    run_name: str = _f("", "run directory name; empty = a timestamp")
    log_interval: int = _f(1, "write metrics every N steps")
    save_interval_steps: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    sample_interval_steps: int = _f(
        25,
        "every N steps write the group's videos (GIF + MP4, branches side by side) and a "
        "branch-grid PNG of the fork window (0 = never)",
    )
    tensorboard: bool = _f(False, "also log to TensorBoard (pip install tensorboard)")
    wandb: bool = _f(False, "also log to Weights & Biases (pip install wandb; WANDB_MODE applies)")
    wandb_project: str = _f("kvpo", "W&B project of the run (its name is run_name)")
    show_progress: bool = _f(
        True, "progress: a bar on a terminal, else one line every progress_interval steps"
    )
    progress_interval: int = _f(10, "steps between progress lines when stdout is not a terminal")

    @property
    def resident_frames(self) -> int:
        return self.model_kwargs.local_attn_size + self.slice_last_frames

    @property
    def switch_frames(self) -> list[int]:
        return parse_int_list(self.switch_frame_indices, "switch_frame_indices")

    @property
    def reward_weights(self) -> dict[str, float]:
        return {c.name: c.weight for c in self.reward_components}

    @property
    def eval_reward_weights(self) -> dict[str, float]:
        """Held-out components and weights: ``eval_reward_components`` or, when empty,
        :attr:`reward_weights`."""
        return {c.name: c.weight for c in self.eval_reward_components} or self.reward_weights

    @property
    def rows_per_batch(self) -> int:
        """Rows alive at once (rollout, replays, evaluation): ``row_micro_batch`` or G + 1."""
        from kvpo.training.config_parse import row_micro_batch

        return min(row_micro_batch(self) or self.K + 1, self.K + 1)

    @property
    def torch_dtype(self):
        from kvpo.training.config_parse import torch_dtype

        return torch_dtype(self)

    def to_dict(self) -> dict:

        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def parse_int_list(value: str | list, what: str) -> list[int]:
    """``"39, 75, 111"`` or ``[39, 75, 111]`` -> ``[39, 75, 111]``."""
    items = value if isinstance(value, list) else [s for s in str(value).split(",") if s.strip()]
    try:
        return [int(str(s).strip()) for s in items]
    except ValueError as err:
        raise ConfigError(f"{what} must be comma-separated integers, got {value!r}") from err
