"""The KVPO authors' training YAML files (``configs/train_kvpo_longlive.yaml`` and
``configs/train_kvpo_memflow.yaml`` of the public KVPO repository), read as they are.

:func:`load_config <kvpo.training.config_parse.load_config>` calls :func:`is_authors_format` on
every YAML file it reads; a file in the authors' format (it has a key only they use, such as
``gradient_accumulation_steps``, ``per_step_protect_mode`` or ``adapter.verbose``) goes through
:func:`translate`, which returns this project's keys with every value converted from the
authors' units, a row per key for the mapping table (``python -m kvpo.train --config FILE
--check`` prints it: :func:`mapping_table`) and the lines printed when the file is loaded:

- a key that sets one of this project's keys (``mapped``) is silent unless the conversion is not
  exact here, and then its line says what differs;
- a key with no effect here (launcher, hardware placement, logging, debug output; ``no effect
  here``) prints one line saying why;
- a key whose behaviour this project does not implement (``not implemented here``) prints one
  line saying what the authors' run does with it, unless its value is the one that does nothing;
  the run proceeds without it.

A key in neither the authors' table (:data:`RULES`) nor this project's config is an error that
names the closest key. Keys of this project's config may sit in the same file; they are applied
after the translation and win. ``key=value`` overrides on the command line are this project's
keys. ``docs/authors-config.md`` is :func:`markdown` (``python -m
kvpo.training.authors_config --markdown``).

Units: the authors' trainer counts a *training step* as ``gradient_accumulation_steps``
rollouts (at its end the old policy is re-synced and the LR schedule advances once, while AdamW
steps ``ppo_epochs`` times after every rollout), and so does this project's, with
``sync_every`` rollouts (:class:`kvpo.training.learner.Counters`): ``max_train_steps``,
``lr_warmup_steps`` and the ``*_interval_steps`` carry over unchanged. Where this project's
step is still one rollout (:func:`steps_are_sync_windows` false: code from before training steps
of ``sync_every`` rollouts), those step counts are multiplied by ``gradient_accumulation_steps``
and ``lr_warmup_steps`` by ``gradient_accumulation_steps * ppo_epochs`` (AdamW steps).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvpo.training.config import ConfigError

MAPPED = "mapped"
NO_EFFECT = "no effect here"
NOT_IMPLEMENTED = "not implemented here"
KINDS = (MAPPED, NO_EFFECT, NOT_IMPLEMENTED)
OURS = "this project's key"  # the row of a key of this project's config in the file
IMPLIED_KIND = "implied"  # the row of a setting their code fixes without a key

ALIAS = "<alias>"  # a user-chosen node name under multinode.nodes
NODES = "multinode.nodes."


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()
"""``Rule.default`` of a key the authors' code needs (it stops without it)."""


@dataclass(frozen=True)
class Rule:
    """One key of the authors' files: what their code does with it and what it does here.

    ``default``: the value their code uses when the key is absent (their ``getattr`` default,
    or their ``configs/default_config.yaml``); :data:`REQUIRED` when their code needs the key;
    None where the absence has no effect. ``group``: rules printed as one line (the launcher's
    ``multinode`` section).
    """

    key: str
    kind: str
    theirs: str
    here: str
    default: Any = None
    group: str | None = None


def _node(field_name: str, theirs: str) -> Rule:
    return Rule(
        f"{NODES}{ALIAS}.{field_name}",
        NO_EFFECT,
        theirs,
        "no effect here: the multi-node launcher's ssh target; start this project's trainer on "
        "every node with torchrun --nnodes N --node_rank R --master_addr HOST -m kvpo.train",
        group="multinode",
    )


_STEPS = "training steps of sync_every rollouts, as theirs"

# fmt: off
RULES: tuple[Rule, ...] = (
    # ---- generator checkpoint
    Rule("generator_ckpt", MAPPED,
         "base generator weights (.pt holding 'generator', 'generator_ema' or 'model'); a "
         "relative path is taken from the KVPO repository root",
         "generator_ckpt (a relative path is taken from the working directory)"),
    Rule("lora_ckpt", MAPPED,
         "LoRA weights loaded into the trained adapter: training continues from them, and the "
         "old policy and the KL reference start as copies of the model with them",
         "lora_ckpt, merged into the frozen base at scale adapter.alpha / adapter.rank "
         "(lora_ckpt_alpha = adapter.alpha) with a fresh adapter trained on top: the same "
         "starting policy and KL reference; the trained adapter starts at zero, not at the "
         "loaded weights (printed)"),
    # ---- denoising schedule
    Rule("denoising_step_list", MAPPED, "timesteps of the few-step sampler",
         "denoising_step_list", REQUIRED),
    Rule("warp_denoising_step", MAPPED,
         "map the timesteps through the shifted flow-matching schedule",
         "warp_denoising_step", False),
    Rule("last_step_only", MAPPED,
         "true: every block of the rollout runs every denoising step; false: each block stops "
         "at a random step (one draw per rollout), its x0 prediction there is the block",
         "true is this project's sampler; false is not implemented here (printed)", False),
    Rule("num_frame_per_block", MAPPED, "latent frames generated per block",
         "num_frame_per_block", 3),
    # ---- model
    Rule("model_kwargs.local_attn_size", MAPPED,
         "frames a block attends to, sink and current block included (-1: global attention)",
         "model_kwargs.local_attn_size", -1),
    Rule("model_kwargs.timestep_shift", MAPPED, "flow-matching time shift of the scheduler",
         "model_kwargs.timestep_shift", 8.0),
    Rule("model_kwargs.sink_size", MAPPED, "first frames kept in the cache (attention sink)",
         "model_kwargs.sink_size", 0),
    Rule("model_kwargs.bank_size", NOT_IMPLEMENTED,
         "MemFlow: a memory bank of bank_size frames of compressed K/V from earlier blocks, "
         "attended between the sink and the local window",
         "not implemented here: the causal model keeps LongLive's sink + window cache, so a "
         "MemFlow checkpoint runs without its memory bank (printed whenever set)"),
    Rule("model_kwargs.record_interval", NOT_IMPLEMENTED,
         "MemFlow: blocks between two writes into the memory bank",
         "not implemented here (no memory bank; printed whenever set)"),
    Rule("model_kwargs.SMA", NOT_IMPLEMENTED,
         "MemFlow sparse memory activation: a block attends to the top-3 bank frames for its "
         "query instead of the whole bank",
         "not implemented here (no memory bank); false does nothing"),
    # ---- streaming
    Rule("streaming_chunk_size", MAPPED, "frames of the first streaming chunk",
         "streaming_chunk_size", REQUIRED),
    Rule("streaming_max_length", MAPPED, "latent frames per training video",
         "streaming_max_length", REQUIRED),
    Rule("streaming_min_new_frame", MAPPED, "frames of every later chunk",
         "streaming_min_new_frame", REQUIRED),
    Rule("slice_last_frames", MAPPED,
         "the cache holds local_attn_size + slice_last_frames frames (older frames to route)",
         "slice_last_frames", 21),
    Rule("context_noise", MAPPED, "timestep of the context pass that writes a block's K/V",
         "context_noise", 0),
    # ---- prompts
    Rule("data_path", MAPPED,
         "prompt file: formatted .txt ('n,[segment],[segment]') or .jsonl ('prompts' lists); "
         "the last eval_prompts sequences are held out; training sweeps the rest in order",
         "data_path (both formats are read here, same hold-out rule); here training draws the "
         "sequences at random (seeded), not in file order (printed)", REQUIRED),
    Rule("prompt_min_segments", NOT_IMPLEMENTED,
         "drops prompt sequences with fewer segments",
         "not implemented here yet (no config key; load_prompt_file has min_segments): "
         "shorter sequences are kept and their last segment continues; empty does nothing"),
    Rule("prompt_max_segments", NOT_IMPLEMENTED,
         "cuts every prompt sequence to this many segments",
         "not implemented here yet (no config key; load_prompt_file has keep_segments): a "
         "sequence with more segments than len(switch_frame_indices) + 1 is an error here; "
         "empty does nothing"),
    Rule("switch_frame_indices", MAPPED,
         "latent frames where the next prompt segment starts (cut to the sequence's segments "
         "- 1, so a shorter sequence's last segment continues)",
         "switch_frame_indices, moved to chunk starts when align_switch_to_chunk is true",
         "57,93,129,165,201"),
    Rule("align_switch_to_chunk", MAPPED,
         "moves each switch frame to the first later chunk start (or the last chunk's start)",
         "applied to switch_frame_indices by this translation", True),
    Rule("global_sink", MAPPED,
         "at a prompt switch, true keeps the sink frames' K/V from the first prompt and "
         "re-encodes the last local_attn_size frames; false clears the cache and re-encodes "
         "the sink with the new prompt too",
         "true is this project's recache; false is not implemented here (printed)", True),
    # ---- exploration
    Rule("K", MAPPED, "G: routed branches per group (plus the unrouted anchor)", "K",
         REQUIRED),
    Rule("branch_backward_chunk_size", MAPPED,
         "back-propagate the policy loss through this many branches at a time (0 or >= K: all "
         "at once); memory only",
         "row_micro_batch (rows per forward: the same two-pass backward, and the rollout's and "
         "replays' rows too); 0 -> 'auto', the memory planner's choice; results do not depend "
         "on it", 0),
    Rule("m_nearest_frames", MAPPED, "nearest frames kept in every routed context",
         "m_nearest_frames", 2),
    Rule("perturb_within_first_x_chunks", MAPPED,
         "the routed window starts in these first chunks", "perturb_within_first_x_chunks", 3),
    Rule("perturb_num_blocks", MAPPED, "P: consecutive routed blocks", "perturb_num_blocks", 3),
    # ---- signals and advantages
    Rule("train_local", MAPPED, "use the local reward (the forked chunk)", "train_local", True),
    Rule("train_global", MAPPED, "use the global reward (per-segment clips)", "train_global",
         True),
    Rule("local_loss_weight", MAPPED,
         "fallback of advantage_fusion_local_weight when that key is absent",
         "advantage_fusion_local_weight when that key is absent, else no effect (as theirs)",
         1.0),
    Rule("global_loss_weight", MAPPED,
         "fallback of advantage_fusion_global_weight when that key is absent",
         "advantage_fusion_global_weight when that key is absent, else no effect (as theirs)",
         1.0),
    Rule("anchor_grad_steps", NOT_IMPLEMENTED,
         "kl_loss_mode=try_kl only: denoising steps of the anchor replay that carry gradient",
         "not implemented here (try_kl is not); no effect unless kl_loss_mode is try_kl", 4),
    Rule("policy_window_frames", MAPPED,
         "latent frames after the fork whose replay forms pi; 0 = P x F x "
         "policy_window_multiple; at least P x F, rounded up to whole blocks",
         "policy_window_frames, resolved with policy_window_multiple (0 when it is the routed "
         "window)", 0),
    Rule("policy_window_multiple", MAPPED,
         "policy window = round(P x F x multiple) frames when policy_window_frames is 0",
         "folded into policy_window_frames", 2.0),
    Rule("advantage_fusion_mode", MAPPED, "per-signal scaling before fusion (std, zscore, none)",
         "advantage_fusion_mode", "std"),
    Rule("advantage_fusion_local_weight", MAPPED, "weight of the local advantage",
         "advantage_fusion_local_weight"),
    Rule("advantage_fusion_global_weight", MAPPED, "weight of the global advantage",
         "advantage_fusion_global_weight"),
    # ---- policy
    Rule("policy_log_prob_mode", MAPPED,
         "per_step (alias per_step_x): pi = softmax over branches of the replayed per-step "
         "x0 log-probabilities; the only mode their code accepts",
         "the TVE policy (docs/method.md section 3), the only one here", "per_step_x"),
    Rule("log_prob_grad_steps", MAPPED, "denoising steps replayed with gradient",
         "log_prob_grad_steps", 2),
    Rule("log_prob_sigma_floor", MAPPED,
         "log p = -||x0 - x0_theta||^2 / (2 max(sigma, floor)^2) per step",
         "tve_step_weight and tau: floor >= every step's sigma -> sigma2 and tau = 2 floor^2; "
         "floor <= every sigma -> uniform and tau = 2; in between not expressible (printed)",
         1.0),
    Rule("per_step_protect_mode", MAPPED,
         "when no branch beats the anchor on a signal's raw reward: mechanism_1 zeroes the "
         "loss (and skips the optimizer step when no rank has such a branch); mechanism_2 "
         "adds an anchor slot of logit 0 to the branch softmax and scales the loss by "
         "1 - pi_anchor = 1/2",
         "gated_scale: mechanism_2 -> 0.5 (exact); mechanism_1 -> 0.0 (the skipped step is "
         "not reproduced: printed)", "mechanism_1"),
    Rule("min_update_entropy_ratio", NOT_IMPLEMENTED,
         "mechanism_2: skips the update when the branch policy's entropy exceeds "
         "(1 - ratio) ln G",
         "not implemented here; 0 does nothing", 0.0),
    Rule("ppo_epochs", MAPPED, "updates per rollout", "ppo_epochs", 3),
    Rule("clip_range", MAPPED,
         "symmetric ratio clip, the fallback of clip_range_low and clip_range_high",
         "clip_range_low / clip_range_high when those are absent, else no effect (as theirs)",
         0.2),
    Rule("clip_range_low", MAPPED, "ratio clip below: 1 - clip_range_low", "clip_range_low"),
    Rule("clip_range_high", MAPPED, "ratio clip above: 1 + clip_range_high",
         "clip_range_high"),
    Rule("adv_clip_max", MAPPED, "clip of the fused advantage (0 = off)", "adv_clip_max", 5.0),
    Rule("kl_coef", MAPPED, "coefficient of the KL term", "kl_coef", 0.0),
    Rule("kl_loss_mode", MAPPED,
         "discrete_kl: KL between the branch softmaxes; try_kl: latent MSE between the "
         "anchor replayed by the current and the reference model",
         "discrete_kl is the KL here; try_kl is not implemented here (printed)",
         "discrete_kl"),
    Rule("kl_reference_initial", MAPPED, "KL reference: the initial model (true) or pi_old",
         "kl_reference_initial", False),
    # ---- optimisation
    Rule("lr", MAPPED, "AdamW learning rate", "lr", REQUIRED),
    Rule("lr_scheduler", MAPPED,
         "diffusers schedule (constant, constant_with_warmup, cosine, linear), advanced once "
         "per training step", "lr_scheduler (the same diffusers schedule, one step per training "
         "step)", "constant_with_warmup"),
    Rule("lr_warmup_steps", MAPPED,
         "warmup in training steps (factor k / warmup at step k, so the first step runs at "
         "LR 0)",
         "lr_warmup_steps (training steps); step s runs at (s + 1) / warmup, one step ahead of "
         "theirs (printed; docs/reference-differences.md)", 10),
    Rule("weight_decay", MAPPED, "AdamW weight decay", "weight_decay", 0.01),
    Rule("gradient_accumulation_steps", MAPPED,
         "rollouts per training step: at its end the old policy is re-synced, the LR schedule "
         "and the step counter advance; AdamW steps after every rollout (not gradient "
         "accumulation)",
         "sync_every (the same training step)", 1),
    Rule("max_grad_norm", MAPPED, "gradient-norm clip", "max_grad_norm", REQUIRED),
    Rule("ema_decay", MAPPED, "EMA of the trainable weights (0 = off); evaluation scores the "
         "online and the EMA weights",
         "ema_decay; held-out evaluation scores one set here: the EMA weights when ema_decay > "
         "0 (eval_use_ema; printed)", 0.0),
    Rule("max_train_steps", MAPPED, "training steps (x gradient_accumulation_steps rollouts)",
         "max_train_steps (training steps of sync_every rollouts: the same rollouts and AdamW "
         "steps)", REQUIRED),
    Rule("log_interval", NO_EFFECT, "not read by the authors' trainers (they log every rollout)",
         "no effect here: metrics.jsonl gets every rollout (log_interval keeps 1)"),
    Rule("save_interval_steps", MAPPED, "checkpoint every N training steps (0: see "
         "save_interval_samples)", f"save_interval_steps: {_STEPS}", 0),
    Rule("save_interval_samples", MAPPED,
         "when save_interval_steps is 0: checkpoint when rollouts x world size crosses a "
         "multiple of N",
         "save_interval_steps when save_interval_steps is 0: N / (num_gpus x sync_every) "
         "rounded up (printed), else no effect", 0),
    Rule("eval_interval_steps", MAPPED, "evaluate every N training steps (0: see "
         "eval_interval_samples)", f"eval_interval_steps: {_STEPS}", 0),
    Rule("eval_interval_samples", MAPPED,
         "when eval_interval_steps is 0: evaluate when rollouts x world size crosses a "
         "multiple of N",
         "eval_interval_steps when eval_interval_steps is 0: N / (num_gpus x sync_every) "
         "rounded up (printed), else no effect", 0),
    Rule("eval_prompts", MAPPED,
         "held-out prompt sequences (the end of data_path), one video each; world_size / "
         "num_gpus / auto = the launched ranks; 0 = no evaluation",
         "eval_prompts with eval_seeds = 1; world_size -> num_gpus (printed); 0 -> no held-out "
         "evaluation (eval_before, eval_after false)", 0),
    Rule("eval_parallel_online_ema", NO_EFFECT,
         "score the online and the EMA weights in one parallel pass (false: one after the "
         "other); both are scored either way",
         "no effect here: scheduling of their evaluation; which weights are scored here: see "
         "ema_decay"),
    Rule("eval_parallel_online_ema_mode", NO_EFFECT,
         "how the parallel evaluation is spread over ranks (same_rank, task_sharded)",
         "no effect here: held-out pairs are split over ranks one by one"),
    Rule("seed", MAPPED, "base seed (each rank seeds seed + rank)",
         "seed (the random streams differ: videos are not bit-identical to theirs)", REQUIRED),
    # ---- rewards
    Rule("reward_components", MAPPED,
         "weighted scorers (items: name, weight); per-component anchor-relative advantages, "
         "weighted and summed",
         "reward_components, and reward_model = the scorer registered here that returns them "
         "(video_hpsv3 for both files)", REQUIRED),
    Rule("use_raw_weighted_reward_advantage", NOT_IMPLEMENTED,
         "true: one advantage per signal from the weighted sum of raw rewards instead of the "
         "weighted sum of per-component advantages",
         "not implemented here; false (their default) does nothing", False),
    Rule("eval_reward_components", NOT_IMPLEMENTED,
         "scorers of the held-out evaluation (absent: reward_components)",
         "not implemented here: held-out evaluation scores reward_components; the same list "
         "does nothing"),
    Rule("reward_batch_size", NO_EFFECT, "videos per scorer call (0: all); memory only",
         "no effect here: results do not depend on it, and this project's reward_batch_size "
         "counts the scorer's own unit (frames per forward for video_hpsv3), so the scorer's "
         "default stays"),
    Rule("vae_temporal_stride", MAPPED,
         "pixel frames per latent frame when placing clips (latent f -> pixel 4f - 3)",
         "4 is fixed here (the Wan VAE); another value is not implemented (printed)", 4),
    Rule("long_reward_enable_normal", MAPPED, "global reward from one clip per prompt segment",
         "the global reward here; false (a global reward of 0) is not implemented (printed)",
         True),
    Rule("long_reward_enable_transition", NO_EFFECT,
         "read, but the clip builder their trainers call adds no transition clips (MemFlow's "
         "post-fork builder that would is never called)",
         "no effect here, as in the authors' trainers"),
    Rule("long_reward_normal_weight", NO_EFFECT,
         "global = (w_n normal + w_t transition) / (w_n + w_t); with no transition clips it "
         "divides out (<= 0 makes the global reward 0)",
         "no effect here, as in the authors' trainers (a value <= 0 is printed as not "
         "implemented)"),
    Rule("long_reward_transition_weight", NO_EFFECT, "weight of the transition clips (none are "
         "built)", "no effect here, as in the authors' trainers"),
    Rule("long_reward_transition_clip_len", NO_EFFECT, "pixel frames of a transition clip (none "
         "are built)", "no effect here, as in the authors' trainers"),
    Rule("long_reward_normal_clip_len", MAPPED,
         "pixel frames of each segment's clip, centred in the segment",
         "long_reward_normal_clip_len (a value <= 0 is 1 frame in their code); default: "
         "LongLive's 21 latent frames in pixels (81), MemFlow's 48 (a file with MemFlow's "
         "model_kwargs)", 81),
    # ---- launcher and hardware
    Rule("num_gpus", NO_EFFECT, "launcher: torchrun --nproc_per_node=num_gpus",
         "no effect here: launch torchrun --nproc_per_node N -m kvpo.train; used only to "
         "resolve eval_prompts: world_size and *_interval_samples"),
    Rule("gpu_ids", NO_EFFECT, "launcher: CUDA_VISIBLE_DEVICES",
         "no effect here: set CUDA_VISIBLE_DEVICES before launching"),
    _node("ssh_host", "multi-node launcher: ssh host of the node"),
    _node("host", "multi-node launcher: ssh host of the node (alias of ssh_host)"),
    _node("hostname", "multi-node launcher: ssh host of the node (alias of ssh_host)"),
    _node("ssh_port", "multi-node launcher: ssh port of the node"),
    _node("port", "multi-node launcher: ssh port of the node (alias of ssh_port)"),
    _node("ssh_user", "multi-node launcher: ssh user of the node"),
    _node("user", "multi-node launcher: ssh user of the node (alias of ssh_user)"),
    Rule("multinode.master", NO_EFFECT, "multi-node launcher: alias of the master node",
         "no effect here (see multinode.nodes)", group="multinode"),
    Rule("multinode.workers", NO_EFFECT, "multi-node launcher: aliases of the worker nodes",
         "no effect here (see multinode.nodes)", group="multinode"),
    Rule("gradient_checkpointing", MAPPED, "recompute grad-carrying forwards in the backward",
         "gradient_checkpointing", False),
    Rule("offload_models", NO_EFFECT,
         "move the old and initial generator copies and the VAE to the CPU when idle",
         "no effect here: the old policy and the KL reference are adapters of the one "
         "generator (a second LoRA adapter, LoRA disabled), so there are no copies to move; "
         "reward_offload moves the reward model"),
    # ---- output
    Rule("output_dir", MAPPED, "parent directory of run directories (from the repository root)",
         "output_dir (from the working directory)", REQUIRED),
    Rule("run_name", MAPPED, "run directory name; empty = a timestamp", "run_name", ""),
    Rule("group_outputs_by_run", MAPPED,
         "true: a fresh run directory under output_dir; false: write into output_dir",
         "true is this project's layout; false is not implemented here (printed)", True),
    Rule("resume_output_dir_from_checkpoint", MAPPED,
         "true: a resumed run writes into the checkpoint's directory",
         "true is --resume here; false is not implemented here (printed)", True),
    Rule("show_progress", MAPPED, "progress bar", "show_progress", True),
    Rule("debug_save_first_video_group", NO_EFFECT,
         "save the first rollout group's videos (debug)",
         "no effect here: samples/ gets the group's videos every sample_interval_steps"),
    Rule("debug_video_group_fps", NO_EFFECT, "frame rate of those debug videos",
         "no effect here (debug output)"),
    Rule("debug_video_group_subdir", NO_EFFECT, "directory of those debug videos",
         "no effect here (debug output)"),
    # ---- LoRA
    Rule("adapter.type", MAPPED, "adapter type (lora only)", "adapter.type", "lora"),
    Rule("adapter.rank", MAPPED, "LoRA rank", "adapter.rank", 16),
    Rule("adapter.alpha", MAPPED, "LoRA alpha (empty = rank)",
         "adapter.alpha and lora_ckpt_alpha (empty -> rank)"),
    Rule("adapter.dropout", MAPPED, "LoRA dropout", "adapter.dropout", 0.0),
    Rule("adapter.verbose", NO_EFFECT, "print the names of the LoRA target modules",
         "no effect here (logging)"),
    Rule("adapter.dtype", NO_EFFECT,
         "not read by the authors' code: the adapter runs in the generator's dtype (bfloat16)",
         "no effect here: the adapter computes in dtype (bfloat16 in this translation)"),
)
# fmt: on

RULE_BY_KEY = {r.key: r for r in RULES}
MEMFLOW_ONLY = frozenset({
    "model_kwargs.bank_size", "model_kwargs.record_interval", "model_kwargs.SMA", "log_interval",
    "adapter.dtype",
})  # fmt: skip
"""Keys of ``train_kvpo_memflow.yaml`` that ``train_kvpo_longlive.yaml`` does not have."""
MEMFLOW_MODEL = ("model_kwargs.bank_size", "model_kwargs.record_interval", "model_kwargs.SMA")
"""Keys that make a file MemFlow's (where their trainers' defaults differ)."""
LAUNCHER_SPELLINGS = frozenset(f"{NODES}{ALIAS}.{k}" for k in ("host", "hostname", "port", "user"))
"""Keys neither file has that the authors' multi-node launcher reads as well."""


def _files(key: str) -> str:
    if key in MEMFLOW_ONLY:
        return "MemFlow"
    return "(launcher)" if key in LAUNCHER_SPELLINGS else "both"


IMPLIED = (
    ("sampler_rule", "x0", "their distilled models re-noise x0_hat between steps"),
    ("dtype", "bfloat16", "their trainer runs the generator in bfloat16"),
    (
        "wan_model_path",
        "wan_models/Wan2.1-T2V-1.3B",
        "where their code loads umT5 and the VAE (here a diffusers-layout directory: "
        "text_encoder/, tokenizer/, vae/)",
    ),
    ("eval_seeds", 1, "their held-out evaluation makes one video per prompt"),
)
"""Keys their files do not state but their code fixes: ``(our key, value, why)``."""

SCORERS = {
    "video_hpsv3": ("video_hpsv3",),
    "videoalign": ("videoalign", "videoalign_vq", "videoalign_mq_rgb", "videoalign_ta"),
    "videoalign_vq": ("videoalign_vq",),
    "videoalign_mq": ("videoalign_mq",),
    "videoalign_ta": ("videoalign_ta",),
    "motion_smoothness": ("motion_smoothness",),
    "dynamic_degree": ("dynamic_degree",),
}
"""Scorers registered here (:mod:`kvpo.rewards.registry`) that the authors' component names
call, with the components each returns that their names match (a test checks them)."""


def _pattern(key: str) -> str:
    """``key`` with a node alias replaced by :data:`ALIAS` (the table's spelling)."""
    if key.startswith(NODES):
        rest = key[len(NODES) :].split(".", 1)
        return NODES + ALIAS + ("." + rest[1] if len(rest) > 1 else "")
    return key


def _our_keys() -> set[str]:
    from kvpo.training.config_parse import all_keys

    return set(all_keys())


@functools.lru_cache(maxsize=1)
def _sections() -> frozenset[str]:
    """Dotted keys whose value is a mapping of further keys (theirs or ours)."""
    out = set()
    for key in [r.key for r in RULES] + sorted(_our_keys()):
        parts = key.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(out)


def flatten(data: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a config mapping (lists are leaves; a section
    left empty or null yields nothing)."""
    sections = _sections()
    for key, value in data.items():
        dotted = prefix + str(key)
        if _pattern(dotted) in sections and (value is None or isinstance(value, Mapping)):
            yield from flatten(value or {}, dotted + ".")
        else:
            yield dotted, value


def is_authors_format(data: Any) -> bool:
    """Whether a parsed YAML mapping is in the authors' format: it has a key that only their
    files use (a rule key that is not one of this project's keys)."""
    if not isinstance(data, Mapping):
        return False
    ours = _our_keys()
    return any(
        _pattern(key) in RULE_BY_KEY and _pattern(key) not in ours for key, _ in flatten(data)
    )


def _unknown(key: str) -> ConfigError:
    known = sorted({r.key for r in RULES} | _our_keys())
    close = difflib.get_close_matches(_pattern(key), known, n=1, cutoff=0.6)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = [lowered[c] for c in difflib.get_close_matches(key.lower(), lowered, 1, 0.5)]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown config key {key!r} in a KVPO authors' config (neither one of the authors' keys "
        f"nor one of this project's){hint} (docs/authors-config.md lists the authors' keys, "
        "--help this project's)"
    )


@dataclass
class Row:
    """One line of the mapping table: a key of the file (or an implied setting), its value in
    the file, its category and what it became here."""

    key: str
    value: Any
    kind: str
    result: str
    present: bool = True


@dataclass
class Translation:
    """``values``: this project's config (nested mapping for
    :func:`~kvpo.training.config_parse.from_dict`); ``rows``: the mapping table; ``notes``: the
    lines printed when the file is loaded."""

    values: dict
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Keys of the file per category."""
        out = dict.fromkeys(KINDS, 0)
        for row in self.rows:
            if row.present and row.kind in out:
                out[row.kind] += 1
        return out


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError as err:
        raise ConfigError(f"{key} must be an integer, got {value!r}") from err
    if not number.is_integer():
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(number)


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} must be a number, got {value!r}") from err


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _ints(value: Any, key: str) -> list[int]:
    items = value if isinstance(value, list) else str(value).split(",")
    return [_int(str(v).strip(), key) for v in items if str(v).strip()]


def steps_are_sync_windows() -> bool:
    """Whether this project's training step is a sync window of ``sync_every`` rollouts, as the
    authors' step is (the learner counts rollouts apart from steps), rather than one rollout."""
    from kvpo.training.learner import Counters

    return "rollouts" in {f.name for f in dataclasses.fields(Counters)}


def _sigmas(steps: list[int], shift: float, warp: bool) -> list[float]:
    """Noise levels of the steps (docs/method.md section 1)."""
    out = []
    for t in steps:
        u = t / 1000
        out.append(shift * u / (1 + (shift - 1) * u) if warp else u)
    return out


class _Translator:
    def __init__(self, data: Mapping):
        self.leaves: dict[str, Any] = {}
        self.ours: dict[str, Any] = {}
        our_keys = _our_keys()
        for key, value in flatten(data):
            if _pattern(key) in RULE_BY_KEY:
                self.leaves[key] = value
            elif key in our_keys:
                self.ours[key] = value
            else:
                raise _unknown(key)
        self.values: dict = {}
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.set_by: dict[str, str] = {}
        self.windows = steps_are_sync_windows()

    # ---------------------------------------------------------------- helpers
    def has(self, key: str) -> bool:
        return key in self.leaves

    def get(self, key: str) -> Any:
        """The file's value, else their code's default (None when it has none)."""
        if key in self.leaves:
            return self.leaves[key]
        default = RULE_BY_KEY[key].default
        return None if default is REQUIRED else default

    def set(self, ours: str, value: Any, source: str) -> None:
        node = self.values
        *parents, last = ours.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        self.set_by[ours] = source

    def row(self, key: str, result: str, kind: str | None = None) -> None:
        """The table row of ``key`` (one per key of the file; absent keys whose default was
        used get a row too)."""
        rule = RULE_BY_KEY[_pattern(key)]
        present = key in self.leaves
        if not present and rule.default is None:
            return
        if not present:
            value = "(absent)"
            result = (
                f"{result} (their code needs this key; this project's default stays)"
                if rule.default is REQUIRED
                else f"{result} (their default {rule.default!r})"
            )
        else:
            value = self.leaves[key]
        self.rows.append(Row(key, value, kind or rule.kind, result, present))

    def note(self, key: str, text: str) -> None:
        value = self.leaves.get(key, RULE_BY_KEY[_pattern(key)].default)
        self.notes.append(f"{key}: {value!r}: {text}")

    def same(self, key: str, ours: str | None = None, conv=None) -> Any:
        """Copy a key whose meaning and unit are this project's, converted by ``conv``."""
        ours = ours or key
        rule = RULE_BY_KEY[key]
        if not self.has(key) and rule.default is REQUIRED:
            self.row(key, f"{ours}: this project's default")
            return None
        value = self.get(key)
        if conv is not None and value is not None:
            value = conv(value, key)
        self.set(ours, value, key)
        self.row(key, f"{ours} = {value!r}")
        return value

    def not_implemented(self, key: str, noop: bool, what: str) -> None:
        """A key this project does not implement: silent (one row) when ``noop``."""
        if not self.has(key):
            return
        if noop:
            self.row(key, "no-op value: nothing to implement", NOT_IMPLEMENTED)
            return
        self.row(key, f"not implemented here: {what}", NOT_IMPLEMENTED)
        self.note(key, f"not implemented here: {what}; the run proceeds without it")

    # ---------------------------------------------------------------- the keys
    def run(self) -> Translation:
        for key, value, _why in IMPLIED:
            self.set(key, value, "(implied)")
        self.checkpoints()
        self.schedule_and_model()
        self.video_and_prompts()
        self.exploration()
        self.advantages()
        self.policy()
        accum = self.optimisation()
        self.intervals_and_evaluation(accum)
        self.rewards()
        self.output_and_launcher()
        self.adapter()
        self.no_effect()
        self.pass_through()
        missing = sorted(
            k for k in self.leaves if not any(r.key == k and r.present for r in self.rows)
        )
        if missing:  # every key of the file must have its row (a bug here, not the user's)
            raise AssertionError(f"keys without a mapping row: {missing}")
        for key, value, why in IMPLIED:
            if self.set_by.get(key) == "(implied)":
                self.rows.append(
                    Row(key, "(implied)", IMPLIED_KIND, f"{key} = {value!r}: {why}", False)
                )
        return Translation(self.values, self.rows, self.notes)

    def checkpoints(self) -> None:
        for key in ("generator_ckpt", "lora_ckpt"):
            value = self.get(key)
            value = str(value) if value not in (None, "") else None
            self.set(key, value, key)
            if self.has(key):
                self.row(key, f"{key} = {value!r}")
        if self.get("lora_ckpt") not in (None, ""):
            self.note(
                "lora_ckpt",
                "mapped to lora_ckpt, not exactly: their run keeps training these LoRA weights "
                "(the adapter starts from them); here they are merged into the frozen base and "
                "a fresh adapter (starting at zero) is trained on top; the starting policy and "
                "the KL reference are the same",
            )

    def schedule_and_model(self) -> None:
        self.same("denoising_step_list", conv=lambda v, k: _ints(v, k))
        if _bool(self.get("last_step_only"), "last_step_only"):
            self.row(
                "last_step_only", "every block runs every denoising step (this project's sampler)"
            )
        else:
            self.row("last_step_only", "not implemented here (false)", NOT_IMPLEMENTED)
            self.note(
                "last_step_only",
                "not implemented here: their rollout stops every block "
                "at one random denoising step (drawn per rollout) and keeps its x0 "
                "prediction there; here every block runs every step; the run proceeds",
            )
        self.same("warp_denoising_step", conv=_bool)
        self.same("num_frame_per_block", conv=_int)
        self.same("model_kwargs.local_attn_size", conv=_int)
        self.same("model_kwargs.timestep_shift", conv=_float)
        self.same("model_kwargs.sink_size", conv=_int)
        self.same("slice_last_frames", conv=_int)
        self.same("context_noise", conv=_int)
        bank = self.get("model_kwargs.bank_size")
        every = self.get("model_kwargs.record_interval")
        self.not_implemented(
            "model_kwargs.bank_size",
            False,
            f"MemFlow's model attends to a memory bank of {bank} frames between the sink and "
            "the local window; this project's causal model keeps LongLive's sink + window "
            "cache, so the MemFlow checkpoint runs without its bank",
        )
        self.not_implemented(
            "model_kwargs.record_interval",
            False,
            f"MemFlow writes a block into its memory bank every {every} blocks (no bank here)",
        )
        sma = self.get("model_kwargs.SMA")
        self.not_implemented(
            "model_kwargs.SMA",
            sma is None or not _bool(sma, "model_kwargs.SMA"),
            "MemFlow's sparse memory activation attends to the top-3 bank frames per query",
        )

    def video_and_prompts(self) -> None:
        lengths = [
            self.same(k, conv=_int)
            for k in ("streaming_max_length", "streaming_chunk_size", "streaming_min_new_frame")
        ]
        data = self.get("data_path")
        self.set("data_path", str(data) if data not in (None, "") else None, "data_path")
        if self.has("data_path"):
            self.row("data_path", f"data_path = {self.values['data_path']!r}")
            self.note(
                "data_path",
                "mapped to data_path, not exactly: their training sweeps the sequences in file "
                "order ((rollout - 1) x world size + rank); here they are drawn at random "
                "(seeded by seed, step and rank)",
            )
        else:
            self.row("data_path", "data_path: this project's default")
        for key, what in (
            (
                "prompt_min_segments",
                "their run drops prompt sequences with fewer than {v} "
                "segments; here shorter sequences are kept (their last segment continues)",
            ),
            (
                "prompt_max_segments",
                "their run cuts every prompt sequence to {v} segments; here "
                "a sequence with more segments than the video has prompt segments "
                "(len(switch_frame_indices) + 1) is an error",
            ),
        ):
            value = self.get(key)
            self.not_implemented(key, value in (None, ""), what.format(v=value))
        switches = _ints(self.get("switch_frame_indices"), "switch_frame_indices")
        align = _bool(self.get("align_switch_to_chunk"), "align_switch_to_chunk")
        aligned = switches
        if align and switches and all(v is not None and v > 0 for v in lengths):
            from kvpo.method.routing import chunk_layout

            starts = [c.start_frame for c in chunk_layout(*lengths)[1:]]
            if starts:
                aligned = [next((s for s in starts if s >= x), starts[-1]) for x in switches]
        text = ", ".join(str(s) for s in aligned)
        self.set("switch_frame_indices", text, "switch_frame_indices")
        moved = "" if aligned == switches else f" (moved from {switches} to chunk starts)"
        self.row("switch_frame_indices", f"switch_frame_indices = {text!r}{moved}")
        if not align:
            effect = "not applied"
        elif aligned == switches:
            effect = f"applied: {switches} are chunk starts already (no change)"
        else:
            effect = f"applied: {switches} -> {aligned}"
        self.row("align_switch_to_chunk", f"switch_frame_indices: {effect}")
        if _bool(self.get("global_sink"), "global_sink"):
            self.row(
                "global_sink",
                "this project's recache (sink kept, last local_attn_size frames re-encoded)",
            )
        else:
            self.row("global_sink", "not implemented here (false)", NOT_IMPLEMENTED)
            self.note(
                "global_sink",
                "not implemented here: their run clears the cache at a "
                "prompt switch and re-encodes the sink with the new prompt; here the sink "
                "keeps the first prompt's K/V; the run proceeds without it",
            )

    def exploration(self) -> None:
        K = self.same("K", conv=_int)
        chunk = _int(self.get("branch_backward_chunk_size") or 0, "branch_backward_chunk_size")
        if K is not None and 0 < chunk < K:
            rows = chunk
            why = f"{chunk} branches per backward pass there"
        else:
            rows = "auto"
            why = "all branches in one backward pass there; here the memory planner's choice"
        self.set("row_micro_batch", rows, "branch_backward_chunk_size")
        self.row(
            "branch_backward_chunk_size",
            f"row_micro_batch = {rows!r} ({why}; results do not depend on it)",
        )
        self.same("m_nearest_frames", conv=_int)
        self.same("perturb_within_first_x_chunks", conv=_int)
        self.same("perturb_num_blocks", conv=_int)

    def advantages(self) -> None:
        self.same("train_local", conv=_bool)
        self.same("train_global", conv=_bool)
        self.same("advantage_fusion_mode", conv=lambda v, k: str(v).strip().lower())
        for side in ("local", "global"):
            fallback, key = f"{side}_loss_weight", f"advantage_fusion_{side}_weight"
            if self.has(key):
                value = _float(self.get(key), key)
                self.row(key, f"{key} = {value!r}")
                self.row(fallback, f"no effect: {key} is set (this key is only its fallback)")
            else:
                value = _float(self.get(fallback), fallback)
                self.row(fallback, f"{key} = {value!r} ({key} is absent)")
            self.set(key, value, key)
        self.same("adv_clip_max", conv=_float)

    def policy(self) -> None:
        mode = str(self.get("policy_log_prob_mode")).strip().lower().replace("-", "_")
        if mode not in ("per_step", "per_step_x", "perstep", "perstep_x"):
            raise ConfigError(
                f"policy_log_prob_mode {mode!r}: the authors' code accepts only per_step "
                "(alias per_step_x), the policy implemented here"
            )
        self.row("policy_log_prob_mode", "the TVE policy (the only one here)")
        self.same("log_prob_grad_steps", conv=_int)
        self.policy_window()
        self.sigma_floor()
        protect = str(self.get("per_step_protect_mode")).strip().lower()
        if protect in ("mechanism_2", "m2", "anchor_entropy"):
            self.set("gated_scale", 0.5, "per_step_protect_mode")
            self.row(
                "per_step_protect_mode",
                "gated_scale = 0.5 (their 1 - pi_anchor with an "
                "anchor logit of 0 beside the branch log-softmax: exactly 1/2)",
            )
            ratio = _float(self.get("min_update_entropy_ratio"), "min_update_entropy_ratio")
            self.not_implemented(
                "min_update_entropy_ratio",
                ratio <= 0,
                f"their run skips the update when the branch policy's entropy exceeds "
                f"(1 - {ratio:g}) ln K",
            )
        elif protect in ("mechanism_1", "m1", "reward_gate"):
            self.set("gated_scale", 0.0, "per_step_protect_mode")
            self.row("per_step_protect_mode", "gated_scale = 0.0 (not exact: printed)")
            self.note(
                "per_step_protect_mode",
                "mapped to gated_scale=0.0, not exactly: their run also skips the optimizer "
                "step when no rank has a branch beating the anchor (AdamW moments, weight decay "
                "and EMA do not move); here that step runs with a zero loss",
            )
            if self.has("min_update_entropy_ratio"):
                self.row(
                    "min_update_entropy_ratio",
                    "no effect: read by mechanism_2 only",
                    NOT_IMPLEMENTED,
                )
        else:
            raise ConfigError(
                f"per_step_protect_mode {protect!r}: the authors' code accepts mechanism_1 or "
                "mechanism_2"
            )
        self.same("ppo_epochs", conv=_int)
        symmetric = _float(self.get("clip_range"), "clip_range")
        used = []
        for side in ("low", "high"):
            key = f"clip_range_{side}"
            value = _float(self.get(key), key) if self.has(key) else symmetric
            used += [] if self.has(key) else [key]
            self.set(key, value, key)
            if self.has(key):
                self.row(key, f"{key} = {value!r}")
        self.row(
            "clip_range",
            f"{' and '.join(used)} = {symmetric!r}"
            if used
            else "no effect: clip_range_low and clip_range_high are set (this key is only "
            "their fallback)",
        )
        self.same("kl_coef", conv=_float)
        kl = str(self.get("kl_loss_mode")).strip().lower()
        if kl in ("discrete_kl", "discrete-kl", "distribution", "pi_kl", "branch_discrete_kl"):
            self.row("kl_loss_mode", "the discrete KL over the K branches (kl_coef)")
            try_kl = False
        elif kl in ("try_kl", "try-kl", "anchor_l2", "anchor_mse", "ref_anchor_l2"):
            try_kl = True
            self.row(
                "kl_loss_mode",
                "not implemented here (try_kl): the discrete KL is used",
                NOT_IMPLEMENTED,
            )
            self.note(
                "kl_loss_mode",
                "not implemented here: their try_kl replays the anchor "
                "under the current and the reference model and penalises the latent MSE "
                "between them; here the discrete KL over the branches is used instead",
            )
        else:
            raise ConfigError(
                f"kl_loss_mode {kl!r}: the authors' code accepts discrete_kl or try_kl"
            )
        steps = self.get("anchor_grad_steps")
        self.not_implemented(
            "anchor_grad_steps",
            not try_kl,
            f"their try_kl replay back-propagates through the first {steps} denoising steps",
        )
        self.same("kl_reference_initial", conv=_bool)

    def policy_window(self) -> None:
        """Their window: ``policy_window_frames`` or round(P F multiple), at least P F, rounded
        up to whole blocks; here 0 stands for the routed window (P F frames)."""
        frames = _int(self.get("policy_window_frames"), "policy_window_frames")
        multiple = _float(self.get("policy_window_multiple"), "policy_window_multiple")
        block = self.values.get("num_frame_per_block") or 3
        routed = (self.values.get("perturb_num_blocks") or 3) * block
        requested = frames if frames > 0 else int(round(routed * multiple))
        resolved = -(-max(requested, routed) // block) * block
        ours = 0 if resolved == routed else resolved
        self.set("policy_window_frames", ours, "policy_window_frames")
        how = "the routed window" if ours == 0 else f"{resolved} frames"
        self.row(
            "policy_window_frames",
            f"policy_window_frames = {ours} ({how}: {resolved} frames, P x F = {routed})",
        )
        if frames > 0:
            self.row("policy_window_multiple", "no effect: policy_window_frames is set")
        else:
            self.row(
                "policy_window_multiple",
                f"policy_window_frames = {ours} (round({routed} x "
                f"{multiple:g}) = {requested} frames, at least {routed}, whole blocks)",
            )

    def sigma_floor(self) -> None:
        key = "log_prob_sigma_floor"
        floor = _float(self.get(key), key)
        steps = self.values.get("denoising_step_list") or [1000, 750, 500, 250]
        mk = self.values.get("model_kwargs", {})
        sig = _sigmas(
            steps, mk.get("timestep_shift") or 1.0, bool(self.values.get("warp_denoising_step"))
        )
        if floor >= max(sig) - 1e-9:
            weight, tau = "sigma2", 2 * floor**2
        elif floor <= min(sig):
            weight, tau = "uniform", 2.0
        else:
            weight, tau = "sigma2", 2 * floor**2
            self.note(
                key,
                "not expressible here: their per-step weight is sigma^2 / max(sigma, "
                f"floor)^2 on the velocity error, between the step sigmas "
                f"{[round(s, 4) for s in sig]}; tve_step_weight=sigma2 with tau="
                f"{tau:g} is used instead (exact for the steps below the floor)",
            )
        self.set("tve_step_weight", weight, key)
        self.set("tau", tau, key)
        self.row(
            key,
            f"tve_step_weight = {weight!r}, tau = {tau!r} (step sigmas "
            f"{[round(s, 4) for s in sig]})",
        )

    def optimisation(self) -> int:
        self.same("lr", conv=_float)
        self.same("lr_scheduler", conv=lambda v, k: str(v).strip())
        self.same("weight_decay", conv=_float)
        self.same("max_grad_norm", conv=_float)
        self.same("gradient_checkpointing", conv=_bool)
        accum = _int(self.get("gradient_accumulation_steps"), "gradient_accumulation_steps")
        self.set("sync_every", accum, "gradient_accumulation_steps")
        self.row(
            "gradient_accumulation_steps",
            f"sync_every = {accum} (old policy re-synced "
            f"every {accum} rollouts; one AdamW step per rollout and epoch in both)",
        )
        epochs = self.values.get("ppo_epochs") or 1
        per = 1 if self.windows else accum  # this project's steps per sync window
        warmup = _int(self.get("lr_warmup_steps"), "lr_warmup_steps")
        steps = self.get("max_train_steps")
        steps = None if steps is None else _int(steps, "max_train_steps")
        if self.windows:
            self.set("lr_warmup_steps", warmup, "lr_warmup_steps")
            self.row("lr_warmup_steps", f"lr_warmup_steps = {warmup} (training steps, as theirs)")
            if warmup > 0 and self.values.get("lr_scheduler") != "constant":
                self.note(
                    "lr_warmup_steps",
                    f"mapped to lr_warmup_steps={warmup}, not exactly: their first training "
                    f"step runs at LR 0 (diffusers' factor k/{warmup} from k = 0); here training "
                    f"step s runs at (s + 1)/{warmup}, one step ahead, and a decaying schedule "
                    "spans max_train_steps + 1 steps (docs/reference-differences.md)",
                )
        else:
            ours = warmup * accum * epochs
            self.set("lr_warmup_steps", ours, "lr_warmup_steps")
            self.row(
                "lr_warmup_steps",
                f"lr_warmup_steps = {ours} ({warmup} sync windows x {accum} rollouts x {epochs} "
                "AdamW steps)",
            )
            if warmup > 0 and self.values.get("lr_scheduler") != "constant":
                self.note(
                    "lr_warmup_steps",
                    f"mapped to lr_warmup_steps={ours}, not exactly: their LR changes once per "
                    f"sync window (factor k/{warmup} in window k = 0..{warmup - 1}, so the first "
                    f"{accum} rollouts run at LR 0); here it changes every AdamW step, "
                    f"(k + 1)/{ours}, over the same rollouts",
                )
        if steps is None:
            self.row("max_train_steps", "max_train_steps: this project's default")
        else:
            self.set("max_train_steps", steps * per, "max_train_steps")
            unit = "training steps of" if self.windows else "sync windows x"
            self.row(
                "max_train_steps",
                f"max_train_steps = {steps * per} ({steps} {unit} {accum} rollouts: "
                f"{steps * accum} rollouts, {steps * accum * epochs} AdamW steps in both)",
            )
        ema = _float(self.get("ema_decay"), "ema_decay")
        self.set("ema_decay", ema, "ema_decay")
        self.set("eval_use_ema", ema > 0, "ema_decay")
        self.row("ema_decay", f"ema_decay = {ema!r}, eval_use_ema = {ema > 0}")
        if ema > 0:
            self.note(
                "ema_decay",
                "mapped to ema_decay, not exactly: their evaluation scores the "
                "online and the EMA weights; here one set is scored, the EMA weights "
                "(eval_use_ema=true; eval_use_ema=false for the online ones)",
            )
        return accum

    def _world(self) -> int:
        value = self.leaves.get("num_gpus", 1)
        return max(1, _int(value, "num_gpus"))

    def intervals_and_evaluation(self, accum: int) -> None:
        for what in ("save", "eval"):
            steps_key, samples_key = f"{what}_interval_steps", f"{what}_interval_samples"
            steps = _int(self.get(steps_key), steps_key)
            samples = _int(self.get(samples_key), samples_key)
            per = 1 if self.windows else accum
            if steps > 0:
                ours = steps * per
                how = "training steps, as theirs" if self.windows else f"sync windows x {accum}"
                self.row(steps_key, f"{steps_key} = {ours} ({steps} {how})")
                self.row(samples_key, f"no effect: {steps_key} is set")
            elif samples > 0:
                world = self._world()
                ours = per * math.ceil(samples / (world * accum))
                self.row(steps_key, f"0: {samples_key} decides")
                self.row(samples_key, f"{steps_key} = {ours} (not exact: printed)")
                self.note(
                    samples_key,
                    f"mapped to {steps_key}={ours}, not exactly: every "
                    f"{samples} samples at {world} ranks (num_gpus) is every "
                    f"{samples / world:g} rollouts; rounded up to whole sync windows "
                    f"of {accum}",
                )
            else:
                ours = 0
                self.row(steps_key, f"{steps_key} = 0 (never)")
                self.row(samples_key, "0 (never)")
            self.set(steps_key, ours, steps_key)
        raw = self.get("eval_prompts")
        if isinstance(raw, str) and not raw.strip().lstrip("+-").isdigit():
            if raw.strip().lower() not in ("world_size", "num_gpus", "auto"):
                raise ConfigError(
                    f"eval_prompts {raw!r}: the authors' code accepts an integer or world_size, "
                    "num_gpus, auto"
                )
            count = self._world()
            self.row("eval_prompts", f"eval_prompts = {count} (num_gpus; printed)")
            self.note(
                "eval_prompts",
                f"mapped to eval_prompts={count}: their {raw} is the number "
                f"of launched ranks, taken here from num_gpus={count} (a multi-node run "
                "holds out num_gpus x nodes: set eval_prompts=N)",
            )
        else:
            count = _int(raw, "eval_prompts")
            self.row(
                "eval_prompts",
                f"eval_prompts = {count}"
                if count > 0
                else "no held-out evaluation: eval_before = eval_after = false",
            )
        if count > 0:
            self.set("eval_prompts", count, "eval_prompts")
        else:
            for key in ("eval_before", "eval_after"):
                self.set(key, False, "eval_prompts")
            self.set("eval_interval_steps", 0, "eval_prompts")
        self.same("seed", conv=_int)

    def rewards(self) -> None:
        comps = self.components("reward_components")
        if comps is None:
            self.row("reward_components", "reward_components: this project's default")
        else:
            self.set("reward_components", comps, "reward_components")
            names = [c["name"] for c in comps]
            scorer = next((s for s, out in SCORERS.items() if all(n in out for n in names)), None)
            result = f"reward_components = {comps!r}"
            if scorer is not None:
                self.set("reward_model", scorer, "reward_components")
                self.row("reward_components", f"{result}, reward_model = {scorer!r}")
            else:
                self.set("reward_model", names[0], "reward_components")
                self.row("reward_components", f"{result}, reward_model = {names[0]!r} (printed)")
                self.note(
                    "reward_components",
                    f"not implemented here: no scorer registered here "
                    f"returns all of {names}; register one that does "
                    "(kvpo.rewards.register_reward) and set reward_model to it",
                )
        flag = self.get("use_raw_weighted_reward_advantage")
        self.not_implemented(
            "use_raw_weighted_reward_advantage",
            not _bool(flag, "use_raw_weighted_reward_advantage"),
            "their run computes one advantage per signal from the weighted sum of the raw "
            "rewards instead of summing weighted per-component advantages",
        )
        evals = self.components("eval_reward_components")
        self.not_implemented(
            "eval_reward_components",
            evals is None or evals == comps,
            f"their held-out evaluation scores {evals}; here it scores reward_components",
        )
        stride = _int(self.get("vae_temporal_stride"), "vae_temporal_stride")
        if stride == 4:
            self.row("vae_temporal_stride", "4, fixed here (the Wan VAE)")
        else:
            self.row("vae_temporal_stride", f"not implemented here ({stride})", NOT_IMPLEMENTED)
            self.note(
                "vae_temporal_stride",
                "not implemented here: the Wan VAE here makes 4 "
                "pixel frames per latent frame; the run proceeds with 4",
            )
        if _bool(self.get("long_reward_enable_normal"), "long_reward_enable_normal"):
            self.row("long_reward_enable_normal", "the global reward here (one clip per segment)")
        else:
            self.row("long_reward_enable_normal", "not implemented here (false)", NOT_IMPLEMENTED)
            self.note(
                "long_reward_enable_normal",
                "not implemented here: with no segment clips "
                "their global reward is 0 for every video; here the global reward is "
                "scored (train_global=false drops it); the run proceeds",
            )
        memflow = any(k in self.leaves for k in MEMFLOW_MODEL)
        default_clip = 48 if memflow else 21 * stride - (stride - 1)  # LongLive: 21 latent frames
        clip = _int(
            self.leaves.get("long_reward_normal_clip_len", default_clip),
            "long_reward_normal_clip_len",
        )
        self.set("long_reward_normal_clip_len", max(1, clip), "long_reward_normal_clip_len")
        self.row("long_reward_normal_clip_len", f"long_reward_normal_clip_len = {max(1, clip)}")

    def components(self, key: str) -> list[dict] | None:
        raw = self.leaves.get(key)
        if raw is None:
            return None
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{key} must be a non-empty list of scorers, got {raw!r}")
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, Mapping) or not item.get("name"):
                raise ConfigError(f"{key}[{i}] must be a scorer name or a mapping with 'name'")
            extra = sorted(set(item) - {"name", "weight"})
            if extra:
                raise ConfigError(
                    f"{key}[{i}] sets {extra}: only 'name' and 'weight' are read here "
                    "(their 'alias' and 'kwargs' are not implemented)"
                )
            out.append(
                {
                    "name": str(item["name"]),
                    "weight": _float(item.get("weight", 1.0), f"{key}[{i}].weight"),
                }
            )
        return out

    def output_and_launcher(self) -> None:
        out = self.get("output_dir")
        if out is not None:
            self.set("output_dir", str(out), "output_dir")
            self.row("output_dir", f"output_dir = {str(out)!r}")
        else:
            self.row("output_dir", "output_dir: this project's default")
        run = self.get("run_name")
        self.set("run_name", "" if run is None else str(run), "run_name")
        self.row("run_name", f"run_name = {self.values['run_name']!r}")
        self.same("show_progress", conv=_bool)
        for key, what in (
            (
                "group_outputs_by_run",
                "their run writes straight into output_dir; here every run "
                "gets its own directory under it",
            ),
            (
                "resume_output_dir_from_checkpoint",
                "their resumed run writes into a fresh run "
                "directory; here --resume continues in the checkpoint's run directory",
            ),
        ):
            if _bool(self.get(key), key):
                self.row(key, "this project's behaviour (fixed)")
            else:
                self.row(key, "not implemented here (false)", NOT_IMPLEMENTED)
                self.note(key, f"not implemented here: {what}; the run proceeds")

    def adapter(self) -> None:
        if not any(k.startswith("adapter.") for k in self.leaves):
            self.notes.append(
                "adapter: absent: not implemented here: without an adapter section their run "
                "trains every weight of the generator; here a LoRA adapter is trained "
                "(adapter.* defaults apply)"
            )
        self.same("adapter.type", conv=lambda v, k: str(v).strip())
        rank = self.same("adapter.rank", conv=_int)
        alpha = self.get("adapter.alpha")
        alpha = _float(alpha, "adapter.alpha") if alpha not in (None, "", 0) else float(rank)
        self.set("adapter.alpha", alpha, "adapter.alpha")
        self.set("lora_ckpt_alpha", alpha, "adapter.alpha")
        if self.has("adapter.alpha"):
            self.row("adapter.alpha", f"adapter.alpha = {alpha!r}, lora_ckpt_alpha = {alpha!r}")
        self.same("adapter.dropout", conv=_float)

    def no_effect(self) -> None:
        grouped: dict[str, list[str]] = {}
        for key in self.leaves:
            rule = RULE_BY_KEY[_pattern(key)]
            if rule.kind != NO_EFFECT:
                continue
            text = rule.here
            if key == "long_reward_normal_weight":
                weight = _float(self.leaves[key], key)
                if weight <= 0:
                    self.row(key, "not implemented here (<= 0)", NOT_IMPLEMENTED)
                    self.note(
                        key,
                        "not implemented here: a weight <= 0 makes their global "
                        "reward 0 for every video; here the global reward is scored "
                        "(train_global=false drops it); the run proceeds",
                    )
                    continue
            self.row(key, text)
            if rule.group is None:
                self.note(key, f"accepted, {text}")
            else:
                grouped.setdefault(rule.group, []).append(key)
        for group, keys in grouped.items():
            self.notes.append(
                f"{group} ({', '.join(keys)}): accepted, no effect here: the multi-node "
                "launcher's ssh targets; start this project's trainer on every node with "
                "torchrun --nnodes N --node_rank R --master_addr HOST -m kvpo.train"
            )

    def pass_through(self) -> None:
        for key, value in self.ours.items():
            source = self.set_by.get(key)
            node = self.values
            for part in key.split(".")[:-1]:
                node = node.get(part, {})
            before = node.get(key.split(".")[-1]) if source else None
            self.set(key, value, "(this project's key)")
            self.rows.append(Row(key, value, OURS, f"{key} = {value!r}"))
            if source is not None and before != value:
                self.notes.append(
                    f"{key}: {value!r}: this project's key in the file overrides {before!r} "
                    f"(from {source})"
                )


def translate(data: Mapping) -> Translation:
    """This project's config from an authors'-format mapping (see the module docstring)."""
    return _Translator(data).run()


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def load(data: Mapping, source: str | Path | None = None, stream=None) -> dict:
    """:func:`translate` ``data`` and print its lines (rank 0 only, to ``stream``, default
    stderr); returns this project's nested config mapping."""
    translation = translate(data)
    if _rank_zero():
        stream = stream or sys.stderr
        counts = translation.counts()
        where = f" {source}" if source is not None else ""
        print(
            f"authors' config{where}: the KVPO authors' format, translated: "
            + ", ".join(f"{n} {kind}" for kind, n in counts.items())
            + " (--check prints the mapping table; docs/authors-config.md)",
            file=stream,
        )
        for line in translation.notes:
            print(f"authors' config: {line}", file=stream)
    return translation.values


def _short(value: Any, width: int = 34) -> str:
    text = value if value in ("(absent)", "(implied)") else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def mapping_table(translation: Translation, source: str | Path | None = None) -> str:
    """The table ``--check`` prints: every key of the file, its value, its category and what
    it became here, then the implied settings and the count per category."""
    lines = [f"KVPO authors' config{' ' + str(source) if source else ''} -> this project's keys:"]
    width = max([len(r.key) for r in translation.rows] + [10])
    lines.append(f"  {'key':<{width}}  {'their value':<34}  {'category':<20}  here")
    for row in translation.rows:
        lines.append(f"  {row.key:<{width}}  {_short(row.value):<34}  {row.kind:<20}  {row.result}")
    counts = translation.counts()
    lines.append(
        f"{sum(counts.values())} keys in the file: "
        + ", ".join(f"{n} {kind}" for kind, n in counts.items())
    )
    return "\n".join(lines)


def check_table(path: str | Path | None) -> str | None:
    """The mapping table of the YAML file at ``path`` when it is in the authors' format."""
    if path is None:
        return None
    data = yaml.safe_load(Path(path).read_text())
    if not is_authors_format(data):
        return None
    return mapping_table(translate(data), path)


def rule_counts() -> dict[str, int]:
    """Rules per category (the table of docs/authors-config.md)."""
    out = dict.fromkeys(KINDS, 0)
    for rule in RULES:
        out[rule.kind] += 1
    return out


def markdown() -> str:
    """``docs/authors-config.md``: every key of the authors' files, by section."""
    counts = rule_counts()
    lines = [
        "# The KVPO authors' config files",
        "",
        "`python -m kvpo.train --config train_kvpo_longlive.yaml` (or `train_kvpo_memflow.yaml`)",
        "reads the KVPO authors' training configs (public KVPO repository, `configs/`) as they",
        "are. A file with a key only their files use (`gradient_accumulation_steps`,",
        "`per_step_protect_mode`, `adapter.verbose`, ...) is translated into this project's keys",
        "([configuration.md](configuration.md)) by `kvpo/training/authors_config.py`; every value",
        "is converted from their units. Loading prints one line per key with no effect here, one",
        "per key whose behaviour is not implemented here (unless its value does nothing), and one",
        "per conversion that is not exact; the run proceeds. A key in neither their files nor this",
        "project's config is an error naming the closest key. `--check` prints the mapping table",
        "of the file (every key, its value, its category, what it became) without running, and",
        "lists paths of the file that do not exist on this machine (a run stops on those).",
        "",
        "```bash",
        "python -m kvpo.train --config train_kvpo_longlive.yaml --check",
        "python -m kvpo.train --config train_kvpo_longlive.yaml generator_ckpt=/ckpt/base.pt \\",
        "    wan_model_path=/models/Wan2.1-T2V-1.3B-Diffusers \\",
        "    reward_path=/models/hpsv3 reward_base_model=/models/Qwen2-VL-7B-Instruct",
        "```",
        "",
        "Overrides after the file are this project's keys (`sync_every=4`, not",
        "`gradient_accumulation_steps=4`); keys of this project's config written into the file",
        "are applied after the translation and win.",
        "",
        "## Units and conversions",
        "",
        "Their trainer counts a *training step* as `gradient_accumulation_steps` (A) rollouts:",
        "at its end the old policy is re-synced, the step counter advances and the LR schedule",
        "steps once, while AdamW steps `ppo_epochs` (N) times after every rollout (their comment:",
        "not gradient accumulation). This project's training step is the same, with `sync_every`",
        "rollouts (`docs/reference-differences.md`), so the step counts carry",
        "over unchanged: `max_train_steps: 1500` is 3000 rollouts and 3000 AdamW steps in both.",
        "",
        "| theirs | here | both files |",
        "| --- | --- | --- |",
        "| `gradient_accumulation_steps` A | `sync_every` = A | 2 |",
        "| `max_train_steps`, `lr_warmup_steps`, `save_interval_steps`, `eval_interval_steps` | "
        "the same (training steps) | 1500, 5, 2, 2 |",
        "| `*_interval_samples` N (when `*_interval_steps` is 0) | `*_interval_steps` = N / "
        "(`num_gpus` x A), rounded up | 0 (unused) |",
        "| `eval_prompts: world_size` | `eval_prompts` = `num_gpus`, `eval_seeds` = 1 | 8 |",
        "| `switch_frame_indices` with `align_switch_to_chunk` | moved to chunk starts | "
        "39, 75, 111 (already chunk starts) |",
        "| `policy_window_frames`, `policy_window_multiple` | `policy_window_frames` (0 = the "
        "routed window) | 0, 1.0 -> 0 |",
        "| `log_prob_sigma_floor` f | `tve_step_weight` sigma2, `tau` = 2 f^2 (f >= every "
        "step's sigma) | 1.0 -> sigma2, tau 2 |",
        "| `per_step_protect_mode` | `gated_scale` | mechanism_2 -> 0.5 |",
        "| `branch_backward_chunk_size` | `row_micro_batch` (0 -> auto) | LongLive 0 -> auto, "
        "MemFlow 4 |",
        "| `adapter.alpha` | `adapter.alpha`, `lora_ckpt_alpha` | 256 |",
        "",
        "The LR warmup is one training step ahead of theirs: their first step runs at LR 0",
        "(diffusers' factor k / W from k = 0), this project's step s at (s + 1) / W; loading says",
        "so. `per_step_protect_mode: mechanism_2` is this project's reward gate exactly: their",
        "anchor slot has logit 0 beside the branches' log-softmax, so pi_anchor = 1 / (1 + 1) and",
        "the loss of a group where no branch beats the anchor on either signal is scaled by 1/2",
        "(`gated_scale` 0.5); with `min_update_entropy_ratio: 0` their entropy skip never fires.",
        "",
        "Settings their code fixes without a key, set by the translation (a key of this",
        "project's config in the file or on the command line changes them):",
        "",
        "| key here | value | why |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{k}` | `{v!r}` | {why} |" for k, v, why in IMPLIED]
    lines += [
        "",
        "`reward_model` is the scorer registered here that returns the `reward_components`",
        "(`video_hpsv3` for both files); its weights are this project's `reward_path` and",
        "`reward_base_model` ([rewards.md](rewards.md)).",
        "",
        "## Every key",
        "",
        f"{len(RULES)} keys: {counts[MAPPED]} {MAPPED}, {counts[NO_EFFECT]} {NO_EFFECT}, "
        f"{counts[NOT_IMPLEMENTED]} {NOT_IMPLEMENTED}. `{ALIAS}` stands for a node name of",
        "their multi-node launcher (`node0`, `node1` in their files; `host`, `hostname`, `port`",
        "and `user` are that launcher's spellings of the ssh keys, in neither file). *File*: the",
        "files that have the key (MemFlow: only `train_kvpo_memflow.yaml`). *Default* is the",
        "value their code uses when the key is absent, which the translation uses too",
        "(*required*: their code stops without it; this project's default stays).",
        "",
        "| key | file | their code | here | category | default |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule in RULES:
        default = "" if rule.default is None else f"`{rule.default!r}`"
        cells = (f"`{rule.key}`", _files(rule.key), rule.theirs, rule.here, rule.kind, default)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        "## Not covered yet",
        "",
        "- `prompt_min_segments` / `prompt_max_segments` and their file-order sweep over the",
        "  prompts: `kvpo.training.prompts` implements them (`min_segments`, `keep_segments`,",
        '  `order="sweep"`) but no config key selects them yet.',
        "- Their LR staircase (one schedule step per sync window) and, with mechanism_1, the",
        "  skipped optimizer step.",
        "- MemFlow's memory bank (`model_kwargs.bank_size`, `record_interval`, `SMA`), `try_kl`,",
        "  `use_raw_weighted_reward_advantage`, separate `eval_reward_components`, scoring both",
        "  the online and the EMA weights in one evaluation.",
        "- Keys of their `configs/default_config.yaml` (merged under their files) that the two",
        "  training files do not set are unknown keys here.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown(), end="")
    elif len(sys.argv) == 2:
        print(check_table(sys.argv[1]) or f"{sys.argv[1]} is not in the KVPO authors' format")
    else:
        sys.exit("usage: python -m kvpo.training.authors_config (--markdown | FILE.yaml)")
