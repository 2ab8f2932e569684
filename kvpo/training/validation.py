"""Validation of a parsed :class:`~kvpo.training.config.TrainConfig` before any work starts.

Every problem found is collected and raised together as one
:class:`~kvpo.training.config.ConfigError`: missing files (checkpoints, prompt files, a resume
directory), prompt files in the wrong format, out-of-range values and choices, a video layout
that does not fit the blocks, and a routing geometry that cannot fit the resident cache.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvpo.method.routing import RoutingError
from kvpo.method.routing_memflow import plan_for_rule
from kvpo.training.config import ConfigError, TrainConfig
from kvpo.training.config_parse import choices
from kvpo.training.prompts import PromptFileError, load_prompt_file


def is_toy_dir(path: str) -> bool:
    """Whether ``path`` is a toy-format model directory (config.json + model.safetensors)."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()


def _value(cfg: TrainConfig, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _ranges(cfg: TrainConfig) -> list[str]:
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key, allowed in choices().items():
        value = _value(cfg, key)
        need(value in allowed, f"{key} must be one of {allowed}, got {value!r}")
    need(cfg.adapter.rank >= 1, f"adapter.rank must be >= 1, got {cfg.adapter.rank}")
    need(cfg.K >= 2, f"K (branches per group) must be >= 2, got {cfg.K}")
    need(cfg.tau > 0, f"tau must be > 0, got {cfg.tau}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.sync_every >= 1, f"sync_every must be >= 1, got {cfg.sync_every}")
    need(cfg.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {cfg.ppo_epochs}")
    need(cfg.max_train_steps >= 0, f"max_train_steps must be >= 0, got {cfg.max_train_steps}")
    need(0 <= cfg.ema_decay < 1, f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    need(0 < cfg.clip_range_low < 1, f"clip_range_low must be in (0, 1), got {cfg.clip_range_low}")
    need(cfg.clip_range_high > 0, f"clip_range_high must be > 0, got {cfg.clip_range_high}")
    need(cfg.kl_coef >= 0, f"kl_coef must be >= 0, got {cfg.kl_coef}")
    need(cfg.gated_scale >= 0, f"gated_scale must be >= 0, got {cfg.gated_scale}")
    ratio = cfg.min_update_entropy_ratio
    need(0 <= ratio <= 1, f"min_update_entropy_ratio must be in [0, 1], got {ratio}")
    need(
        cfg.tve_step_weight != "floored" or cfg.tve_sigma_floor > 0,
        f"tve_step_weight 'floored' needs tve_sigma_floor > 0, got {cfg.tve_sigma_floor}",
    )
    need(cfg.eval_seeds >= 1, f"eval_seeds must be >= 1, got {cfg.eval_seeds}")
    need(cfg.eval_prompts >= 0, f"eval_prompts must be >= 0, got {cfg.eval_prompts}")
    for key in ("prompt_min_segments", "prompt_max_segments"):
        need(getattr(cfg, key) >= 0, f"{key} must be >= 0 (0: off), got {getattr(cfg, key)}")
    mk = cfg.model_kwargs
    need(mk.bank_size >= 0, f"model_kwargs.bank_size must be >= 0 (0: no bank), got {mk.bank_size}")
    need(
        mk.record_interval >= 1,
        f"model_kwargs.record_interval must be >= 1, got {mk.record_interval}",
    )
    need(
        cfg.recache_rule != "memflow" or not cfg.recache_full_kv_cache_after_switch,
        "recache_rule 'memflow' re-encodes the last local_attn_size frames (MemFlow's recache "
        "has no full-cache option): recache_full_kv_cache_after_switch must be false, got true",
    )
    need(cfg.cpu_threads >= 0, f"cpu_threads must be >= 0, got {cfg.cpu_threads}")
    rows = cfg.row_micro_batch
    need(
        rows == "auto" or (isinstance(rows, int) and rows >= 0),
        f"row_micro_batch must be an integer >= 0 or 'auto', got {rows!r}",
    )
    need(cfg.progress_interval >= 1, f"progress_interval must be >= 1, got {cfg.progress_interval}")
    need(cfg.train_local or cfg.train_global, "train_local and train_global are both false")
    steps = cfg.denoising_step_list
    need(
        bool(steps) and all(a > b for a, b in zip(steps, steps[1:])) and steps[-1] > 0,
        f"denoising_step_list must be strictly decreasing positive timesteps, got {steps}",
    )
    need(
        0 <= cfg.log_prob_grad_steps <= len(steps),
        f"log_prob_grad_steps must be in [0, {len(steps)}], got {cfg.log_prob_grad_steps}",
    )
    need(
        1 <= cfg.anchor_grad_steps <= len(steps),
        f"anchor_grad_steps must be in [1, {len(steps)}], got {cfg.anchor_grad_steps}",
    )
    names = [c.name for c in cfg.reward_components]
    need(bool(names), "reward_components is empty: KVPO needs at least one weighted reward")
    need(len(set(names)) == len(names), f"reward_components names repeat: {names}")
    evals = [c.name for c in cfg.eval_reward_components]
    need(len(set(evals)) == len(evals), f"eval_reward_components names repeat: {evals}")
    need(
        cfg.reward_videos_per_call >= 0,
        f"reward_videos_per_call must be >= 0 (0: all videos in one call), got "
        f"{cfg.reward_videos_per_call}",
    )
    problems += _global_reward(cfg)
    try:
        cfg.exploration_config()
    except ConfigError as err:
        problems.append(str(err))
    return problems


def _global_reward(cfg: TrainConfig) -> list[str]:
    """The global reward's clip lengths and weights (kvpo.rewards.clips.GlobalReward)."""
    problems = []
    w_n, w_t = cfg.long_reward_normal_weight, cfg.long_reward_transition_weight
    for key, value in (("long_reward_normal_weight", w_n), ("long_reward_transition_weight", w_t)):
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    if not cfg.long_reward_enable_transition:
        if w_n <= 0:
            problems.append(
                f"long_reward_normal_weight must be > 0 without transition clips (their weight "
                f"divides out; 0 would make the global reward 0 for every video), got {w_n}"
            )
        return problems
    if w_n + w_t <= 0:
        problems.append(
            f"long_reward_normal_weight + long_reward_transition_weight must be > 0, got "
            f"{w_n} + {w_t}"
        )
    if cfg.long_reward_transition_clip_len < 1:
        problems.append(
            "long_reward_transition_clip_len must be >= 1 frame, got "
            f"{cfg.long_reward_transition_clip_len}"
        )
    if cfg.reward_model == "toy":
        problems.append(
            "long_reward_enable_transition scores clips with the authors' transition prompt, "
            "which the toy reward's text alignment cannot parse: use another reward_model"
        )
    return problems


def _layout(cfg: TrainConfig) -> list[str]:
    problems = []
    bs = cfg.num_frame_per_block
    for key in ("streaming_max_length", "streaming_chunk_size", "streaming_min_new_frame"):
        value = getattr(cfg, key)
        if value <= 0 or value % bs:
            problems.append(
                f"{key}={value} must be a positive multiple of num_frame_per_block={bs}"
            )
    try:
        switches = cfg.switch_frames
    except ConfigError as err:
        return problems + [str(err)]
    if any(s % bs or not 0 < s < cfg.streaming_max_length for s in switches) or switches != sorted(
        set(switches)
    ):
        problems.append(
            f"switch_frame_indices {switches} must be increasing block starts (multiples of "
            f"{bs}) inside the video (0, {cfg.streaming_max_length})"
        )
    if cfg.policy_window_frames % bs or cfg.policy_window_frames < 0:
        problems.append(
            f"policy_window_frames={cfg.policy_window_frames} must be 0 or a multiple of {bs}"
        )
    return problems


def _routing(cfg: TrainConfig) -> list[str]:
    try:
        plan_for_rule(
            cfg.routing_rule,
            cfg.routing_geometry(),
            cfg.chunks(),
            cfg.K,
            seed=cfg.seed,
            step=0,
            within_first_x_chunks=cfg.perturb_within_first_x_chunks,
            mode=cfg.routing_mode,
        )
    except RoutingError as err:
        return [f"routing cannot fit the resident cache: {err}"]
    return []


def _files(cfg: TrainConfig, resume: str | None) -> list[str]:
    problems = []
    for key in ("generator_ckpt", "lora_ckpt"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            problems.append(f"{key}: checkpoint path {value!r} does not exist")
    if cfg.generator_ckpt is not None and not is_toy_dir(cfg.generator_ckpt):
        if cfg.wan_model_path is None or not Path(cfg.wan_model_path).is_dir():
            problems.append(
                f"generator_ckpt {cfg.generator_ckpt!r} is a Wan checkpoint: wan_model_path must "
                f"name a local Wan2.1 directory (text_encoder/, tokenizer/, vae/), got "
                f"{cfg.wan_model_path!r}"
            )
        if cfg.data_path is None:
            problems.append("a Wan generator_ckpt needs data_path (the toy prompts are toy-only)")
    max_segments = len(cfg.switch_frames) + 1 if not _layout(cfg) else None
    for key in ("data_path", "eval_data_path"):
        value = getattr(cfg, key)
        if value is not None:
            try:
                load_prompt_file(value, max_segments)
            except PromptFileError as err:
                problems.append(f"{key}: {err}")
    if resume is not None:
        from kvpo.training.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(resume)
        except FileNotFoundError as err:
            problems.append(f"--resume: {err}")
    for key in ("tensorboard", "wandb"):
        if getattr(cfg, key) and importlib.util.find_spec(key) is None:
            problems.append(f"{key}=true but the {key} package is not installed: pip install {key}")
    return problems


def validate(cfg: TrainConfig, resume: str | None = None) -> None:
    """Raise one :class:`ConfigError` listing every problem of ``cfg`` (and ``--resume``)."""
    problems = _ranges(cfg) + _layout(cfg)
    if not problems:
        problems += _routing(cfg)
    problems += _files(cfg, resume)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
