"""The table of the KVPO authors' keys (their ``train_kvpo_*.yaml`` files and multi-node
launcher): what their code does with each, what it does here, its category, their code's default
and how its value is read. ``docs/authors-config.md`` prints it. The row type: :mod:`.rule`.
"""

from __future__ import annotations

from kvpo.training.authors import values
from kvpo.training.authors.rule import (
    ALIAS,
    MAPPED,
    NO_EFFECT,
    NODES,
    REQUIRED,
    Rule,
)


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
         "generator_ckpt (a relative path is taken from the working directory)", parse=values.path),
    Rule("lora_ckpt", MAPPED,
         "LoRA weights loaded into the trained adapter: training continues from them, and the "
         "old policy and the KL reference start as copies of the model with them",
         "lora_ckpt with lora_init = continue: the same (lora_ckpt_alpha = adapter.alpha; the "
         "KL reference is a frozen copy of the loaded adapter)", parse=values.path),
    # ---- denoising schedule
    Rule("denoising_step_list", MAPPED, "timesteps of the few-step sampler",
         "denoising_step_list", REQUIRED, parse=values.integers),
    Rule("warp_denoising_step", MAPPED,
         "map the timesteps through the shifted flow-matching schedule",
         "warp_denoising_step", False, parse=values.boolean),
    Rule("last_step_only", MAPPED,
         "true: every block of the rollout runs every denoising step; false: each block stops "
         "at a random step (one draw per rollout), its x0 prediction there is the block",
         "true is this project's sampler; false is not implemented here (printed)", False,
         parse=values.boolean),
    Rule("num_frame_per_block", MAPPED, "latent frames generated per block",
         "num_frame_per_block", 3, parse=values.integer),
    # ---- model
    Rule("model_kwargs.local_attn_size", MAPPED,
         "frames a block attends to, sink and current block included (-1: global attention)",
         "model_kwargs.local_attn_size", -1, parse=values.integer),
    Rule("model_kwargs.timestep_shift", MAPPED, "flow-matching time shift of the scheduler",
         "model_kwargs.timestep_shift", 8.0, parse=values.number),
    Rule("model_kwargs.sink_size", MAPPED, "first frames kept in the cache (attention sink)",
         "model_kwargs.sink_size", 0, parse=values.integer),
    Rule("model_kwargs.bank_size", MAPPED,
         "MemFlow: a memory bank of bank_size frames of K/V per layer, refreshed by saliency "
         "to the prompt, attended besides the sink and the local window",
         "model_kwargs.bank_size (and routing_rule = 'memflow': their file's routing)", None,
         parse=values.integer),
    Rule("model_kwargs.record_interval", MAPPED,
         "MemFlow: every record_interval blocks a block's first frame enters the bank",
         "model_kwargs.record_interval", None, parse=values.integer),
    Rule("model_kwargs.SMA", MAPPED,
         "MemFlow sparse memory activation: a block attends to the top-3 sink and bank frames "
         "per head for its mean query instead of the whole bank",
         "model_kwargs.sma", False, parse=values.boolean),
    # ---- streaming
    Rule("streaming_chunk_size", MAPPED, "frames of the first streaming chunk",
         "streaming_chunk_size", REQUIRED, parse=values.integer),
    Rule("streaming_max_length", MAPPED, "latent frames per training video",
         "streaming_max_length", REQUIRED, parse=values.integer),
    Rule("streaming_min_new_frame", MAPPED, "frames of every later chunk",
         "streaming_min_new_frame", REQUIRED, parse=values.integer),
    Rule("slice_last_frames", MAPPED,
         "the cache holds local_attn_size + slice_last_frames frames (older frames to route)",
         "slice_last_frames", 21, parse=values.integer),
    Rule("context_noise", MAPPED, "timestep of the context pass that writes a block's K/V",
         "context_noise (the input noised by their scheduler's add_noise at it: "
         "context_add_noise true)", 0, parse=values.integer),
    Rule("recache_full_kv_cache_after_switch", MAPPED,
         "at a prompt switch, re-encodes the whole KV cache (local_attn_size + "
         "slice_last_frames frames, in passes of 21) instead of the last local_attn_size",
         "recache_full_kv_cache_after_switch", False, parse=values.boolean),
    # ---- prompts
    Rule("data_path", MAPPED,
         "prompt file: formatted .txt ('n,[segment],[segment]') or .jsonl ('prompts' lists); "
         "the last eval_prompts sequences are held out; training sweeps the rest in order",
         "data_path (both formats are read here, same hold-out rule) with prompt_order: sweep "
         "((rollout x world + rank) mod N, their order)", REQUIRED, parse=values.path),
    Rule("prompt_min_segments", MAPPED, "drops prompt sequences with fewer segments",
         "prompt_min_segments (empty: 0, off)"),
    Rule("prompt_max_segments", MAPPED, "cuts every prompt sequence to this many segments",
         "prompt_max_segments (empty: 0, off)"),
    Rule("switch_frame_indices", MAPPED,
         "latent frames where the next prompt segment starts (cut to the sequence's segments "
         "- 1, so a shorter sequence's last segment continues)",
         "switch_frame_indices, moved to chunk starts when align_switch_to_chunk is true",
         "57,93,129,165,201", parse=values.integers),
    Rule("align_switch_to_chunk", MAPPED,
         "moves each switch frame to the first later chunk start (or the last chunk's start)",
         "applied to switch_frame_indices by this translation", True, parse=values.boolean),
    Rule("global_sink", MAPPED,
         "at a prompt switch, true keeps the sink frames' K/V from the first prompt and "
         "re-encodes the last local_attn_size frames; false clears the cache and re-encodes "
         "the sink with the new prompt too",
         "true is this project's recache; false is not implemented here (printed)", True,
         parse=values.boolean),
    # ---- exploration
    Rule("K", MAPPED, "G: routed branches per group (plus the unrouted anchor)", "K",
         REQUIRED, parse=values.integer),
    Rule("branch_backward_chunk_size", MAPPED,
         "back-propagate the policy loss through this many branches at a time (0 or >= K: all "
         "at once); memory only",
         "row_micro_batch (rows per forward: the same two-pass backward, and the rollout's and "
         "replays' rows too); 0 -> 'auto', the memory planner's choice; results do not depend "
         "on it", 0),
    Rule("m_nearest_frames", MAPPED, "nearest frames kept in every routed context",
         "m_nearest_frames", 2, parse=values.integer),
    Rule("perturb_within_first_x_chunks", MAPPED,
         "the routed window starts in these first chunks", "perturb_within_first_x_chunks", 3,
         parse=values.integer),
    Rule("perturb_num_blocks", MAPPED, "P: consecutive routed blocks", "perturb_num_blocks", 3,
         parse=values.integer),
    # ---- signals and advantages
    Rule("train_local", MAPPED, "use the local reward (the forked chunk)", "train_local", True,
         parse=values.boolean),
    Rule("train_global", MAPPED, "use the global reward (per-segment clips)", "train_global",
         True, parse=values.boolean),
    Rule("local_loss_weight", MAPPED,
         "fallback of advantage_fusion_local_weight when that key is absent",
         "advantage_fusion_local_weight when that key is absent, else no effect (as theirs)",
         1.0, parse=values.number),
    Rule("global_loss_weight", MAPPED,
         "fallback of advantage_fusion_global_weight when that key is absent",
         "advantage_fusion_global_weight when that key is absent, else no effect (as theirs)",
         1.0, parse=values.number),
    Rule("anchor_grad_steps", MAPPED,
         "kl_loss_mode=try_kl only: denoising steps of the anchor replay that carry gradient",
         "anchor_grad_steps (no effect unless kl_loss_mode is try_kl)", 4,
         parse=values.integer),
    Rule("policy_window_frames", NO_EFFECT,
         "latent frames after the fork of their policy window (0 = P x F x "
         "policy_window_multiple; at least P x F, whole blocks): sizes the try_kl anchor replay "
         "and a target tensor; the energy sums every block of the fork chunk from the fork on "
         "whatever its value",
         "no effect here: the energy blocks are theirs whatever the window (energy_blocks = "
         "'chunk', the default here)",
         0, parse=values.integer),
    Rule("policy_window_multiple", NO_EFFECT,
         "policy window = round(P x F x multiple) frames when policy_window_frames is 0",
         "no effect here (as policy_window_frames)", 2.0, parse=values.number),
    Rule("advantage_fusion_mode", MAPPED, "per-signal scaling before fusion (std, zscore, none)",
         "advantage_fusion_mode", "std", parse=values.lowered),
    Rule("advantage_fusion_local_weight", MAPPED, "weight of the local advantage",
         "advantage_fusion_local_weight", parse=values.number),
    Rule("advantage_fusion_global_weight", MAPPED, "weight of the global advantage",
         "advantage_fusion_global_weight", parse=values.number),
    # ---- policy
    Rule("policy_log_prob_mode", MAPPED,
         "per_step (alias per_step_x): pi = softmax over branches of the replayed per-step "
         "x0 log-probabilities; the only mode their code accepts",
         "the TVE policy (docs/method.md section 3), the only one here", "per_step_x",
         parse=values.snake),
    Rule("log_prob_grad_steps", MAPPED, "denoising steps replayed with gradient",
         "log_prob_grad_steps", 2, parse=values.integer),
    Rule("log_prob_sigma_floor", MAPPED,
         "log p = -||x0 - x0_theta||^2 / (2 max(sigma, floor)^2) per step",
         "tve_step_weight and tau: floor >= every step's sigma -> sigma2 and tau = 2 floor^2; "
         "floor <= every sigma -> uniform and tau = 2; in between -> floored (w_s = sigma^2 / "
         "max(sigma, floor)^2), tve_sigma_floor = floor and tau = 2",
         1.0, parse=values.number),
    Rule("per_step_protect_mode", MAPPED,
         "when no branch beats the anchor on a signal's raw reward: mechanism_1 zeroes the "
         "loss (and skips the optimizer step when no rank has such a branch); mechanism_2 "
         "adds an anchor slot of logit 0 to the branch softmax and scales the loss by "
         "1 - pi_anchor = 1/2",
         "protect_mode: mechanism_2 -> 'gate' with gated_scale 0.5; mechanism_1 -> 'skip' "
         "(zero loss, the update skipped when no rank has a better branch)", "mechanism_1",
         parse=values.lowered),
    Rule("min_update_entropy_ratio", MAPPED,
         "mechanism_2: skips the update on every rank when on some rank the branch policy's "
         "entropy (anchor slot included) exceeds (1 - ratio) ln G",
         "min_update_entropy_ratio (protect_mode 'gate'); no effect with mechanism_1", 0.0,
         parse=values.number),
    Rule("ppo_epochs", MAPPED, "updates per rollout", "ppo_epochs", 3, parse=values.integer),
    Rule("clip_range", MAPPED,
         "symmetric ratio clip, the fallback of clip_range_low and clip_range_high",
         "clip_range_low / clip_range_high when those are absent, else no effect (as theirs)",
         0.2, parse=values.number),
    Rule("clip_range_low", MAPPED, "ratio clip below: 1 - clip_range_low", "clip_range_low",
         parse=values.number),
    Rule("clip_range_high", MAPPED, "ratio clip above: 1 + clip_range_high",
         "clip_range_high", parse=values.number),
    Rule("adv_clip_max", MAPPED, "clip of the fused advantage (0 = off)", "adv_clip_max", 5.0,
         parse=values.number),
    Rule("kl_coef", MAPPED, "coefficient of the KL term", "kl_coef", 0.0, parse=values.number),
    Rule("kl_loss_mode", MAPPED,
         "discrete_kl: KL between the branch softmaxes; try_kl: latent MSE between the "
         "anchor replayed by the current and the reference model",
         "kl_loss_mode (the same two modes; try_kl: kvpo.method.anchor_kl)",
         "discrete_kl", parse=values.lowered),
    Rule("kl_reference_initial", MAPPED, "KL reference: the initial model (true) or pi_old",
         "kl_reference_initial", False, parse=values.boolean),
    # ---- optimisation
    Rule("lr", MAPPED, "AdamW learning rate", "lr", REQUIRED, parse=values.number),
    Rule("lr_scheduler", MAPPED,
         "diffusers schedule (constant, constant_with_warmup, cosine, linear), advanced once "
         "per training step", "lr_scheduler (the same diffusers schedule, one step per training "
         "step)", "constant_with_warmup", parse=values.text),
    Rule("lr_warmup_steps", MAPPED,
         "warmup in training steps (factor k / warmup at step k, so the first step runs at "
         "LR 0)",
         "lr_warmup_steps (training steps); step s runs at (s + 1) / warmup, one step ahead of "
         "theirs (printed; docs/reference-differences.md)", 10, parse=values.integer),
    Rule("weight_decay", MAPPED, "AdamW weight decay", "weight_decay", 0.01, parse=values.number),
    Rule("gradient_accumulation_steps", MAPPED,
         "rollouts per training step: at its end the old policy is re-synced, the LR schedule "
         "and the step counter advance; AdamW steps after every rollout (not gradient "
         "accumulation)",
         "sync_every (the same training step)", 1, parse=values.integer),
    Rule("max_grad_norm", MAPPED, "gradient-norm clip", "max_grad_norm", REQUIRED,
         parse=values.number),
    Rule("ema_decay", MAPPED, "EMA of the trainable weights (0 = off); evaluation scores the "
         "online and the EMA weights",
         "ema_decay; held-out evaluation scores one set here: the EMA weights when ema_decay > "
         "0 (eval_use_ema; printed)", 0.0, parse=values.number),
    Rule("max_train_steps", MAPPED, "training steps (x gradient_accumulation_steps rollouts)",
         "max_train_steps (training steps of sync_every rollouts: the same rollouts and AdamW "
         "steps)", REQUIRED, parse=values.integer),
    Rule("log_interval", NO_EFFECT, "not read by the authors' trainers (they log every rollout)",
         "no effect here: metrics.jsonl gets every rollout (log_interval keeps 1)"),
    Rule("save_interval_steps", MAPPED, "checkpoint every N training steps (0: see "
         "save_interval_samples)", f"save_interval_steps: {_STEPS}", 0, parse=values.integer),
    Rule("save_interval_samples", MAPPED,
         "when save_interval_steps is 0: checkpoint when rollouts x world size crosses a "
         "multiple of N",
         "save_interval_steps when save_interval_steps is 0: N / (num_gpus x sync_every) "
         "rounded up (printed), else no effect", 0, parse=values.integer),
    Rule("eval_interval_steps", MAPPED, "evaluate every N training steps (0: see "
         "eval_interval_samples)", f"eval_interval_steps: {_STEPS}", 0, parse=values.integer),
    Rule("eval_interval_samples", MAPPED,
         "when eval_interval_steps is 0: evaluate when rollouts x world size crosses a "
         "multiple of N",
         "eval_interval_steps when eval_interval_steps is 0: N / (num_gpus x sync_every) "
         "rounded up (printed), else no effect", 0, parse=values.integer),
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
         "seed (the random streams differ: videos are not bit-identical to theirs)", REQUIRED,
         parse=values.integer),
    # ---- rewards
    Rule("reward_components", MAPPED,
         "weighted scorers (items: name, weight); per-component anchor-relative advantages, "
         "weighted and summed",
         "reward_components, and reward_model = the scorer registered here that returns them "
         "(video_hpsv3 for both files)", REQUIRED, parse=values.components),
    Rule("use_raw_weighted_reward_advantage", MAPPED,
         "true: one advantage per signal from the weighted sum of raw rewards instead of the "
         "weighted sum of per-component advantages",
         "use_raw_weighted_reward_advantage", False, parse=values.boolean),
    Rule("eval_reward_components", MAPPED,
         "scorers of the held-out evaluation and the weights of its totals (absent: "
         "reward_components)",
         "eval_reward_components (components of reward_model); one that reward_model does not "
         "return is not implemented (printed; the evaluation scores reward_components)",
         parse=values.components),
    Rule("reward_batch_size", MAPPED, "videos per scorer call (0: all)",
         "reward_videos_per_call (this project's reward_batch_size is the scorer's own unit, "
         "frames per forward for video_hpsv3, and keeps the scorer's default)", 0,
         parse=values.integer),
    Rule("vae_temporal_stride", MAPPED,
         "pixel frames per latent frame when placing clips (latent f -> pixel 4f - 3)",
         "4 is fixed here (the Wan VAE); another value is not implemented (printed)", 4,
         parse=values.integer),
    Rule("long_reward_enable_normal", MAPPED, "global reward from one clip per prompt segment",
         "the global reward here; false (a global reward of 0) is not implemented (printed)",
         True, parse=values.boolean),
    Rule("long_reward_enable_transition", MAPPED,
         "read (their getattr default true), but the clip builder their trainers call "
         "(_build_global_segment_clip_specs) adds no transition clips; MemFlow's "
         "_build_postfork_clip_specs, which would, is never called",
         "long_reward_enable_transition = false whatever the file says (their runs score no "
         "transition clips); true is printed. This project's key of the same name turns them "
         "on in this project's own config format", True, parse=values.boolean),
    Rule("long_reward_normal_weight", NO_EFFECT,
         "global = (w_n normal + w_t transition) / (w_n + w_t), w_t = 0 with no transition "
         "clips: it divides out (<= 0 makes the global reward 0)",
         "no effect here, as in the authors' trainers: the translation builds no transition "
         "clips (long_reward_enable_transition = false), so this project's "
         "long_reward_normal_weight keeps its default (a value <= 0 is printed as not "
         "implemented)", parse=values.number),
    Rule("long_reward_transition_weight", NO_EFFECT, "w_t of the transition clips (none are "
         "built)", "no effect here, as in the authors' trainers: no transition clips "
         "(long_reward_enable_transition = false); this project's key of the same name weights "
         "them when they are on"),
    Rule("long_reward_transition_clip_len", NO_EFFECT, "pixel frames of a transition clip "
         "centred at a switch (none are built)", "no effect here, as in the authors' trainers: "
         "no transition clips (long_reward_enable_transition = false); this project's key of "
         "the same name sets their length when they are on"),
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
         "gradient_checkpointing", False, parse=values.boolean),
    Rule("offload_models", NO_EFFECT,
         "move the old and initial generator copies and the VAE to the CPU when idle",
         "no effect here: the old policy and the KL reference are LoRA adapters of the one "
         "generator (the frozen initial copy ref of a continued lora_ckpt, else LoRA "
         "disabled), so there are no generator copies to move; reward_offload moves the "
         "reward model"),
    # ---- output
    Rule("output_dir", MAPPED, "parent directory of run directories (from the repository root)",
         "output_dir (from the working directory)", REQUIRED),
    Rule("run_name", MAPPED, "run directory name; empty = a timestamp", "run_name", ""),
    Rule("group_outputs_by_run", MAPPED,
         "true: a fresh run directory under output_dir; false: write into output_dir",
         "true is this project's layout; false is not implemented here (printed)", True,
         parse=values.boolean),
    Rule("resume_output_dir_from_checkpoint", MAPPED,
         "true: a resumed run writes into the checkpoint's directory",
         "true is --resume here; false is not implemented here (printed)", True,
         parse=values.boolean),
    Rule("show_progress", MAPPED, "progress bar", "show_progress", True, parse=values.boolean),
    Rule("debug_save_first_video_group", NO_EFFECT, "save the first rollout group's videos (debug)",
         "no effect here: samples/ gets the group's videos every sample_interval_steps"),
    Rule("debug_video_group_fps", NO_EFFECT, "frame rate of those debug videos",
         "no effect here (debug output)"),
    Rule("debug_video_group_subdir", NO_EFFECT, "directory of those debug videos",
         "no effect here (debug output)"),
    # ---- LoRA
    Rule("adapter.type", MAPPED, "adapter type (lora only)", "adapter.type", "lora",
         parse=values.text),
    Rule("adapter.rank", MAPPED, "LoRA rank", "adapter.rank", 16, parse=values.integer),
    Rule("adapter.alpha", MAPPED, "LoRA alpha (empty = rank)",
         "adapter.alpha and lora_ckpt_alpha (empty -> rank)"),
    Rule("adapter.dropout", MAPPED, "LoRA dropout", "adapter.dropout", 0.0, parse=values.number),
    Rule("adapter.verbose", NO_EFFECT, "print the names of the LoRA target modules",
         "no effect here (logging)"),
    Rule("adapter.dtype", NO_EFFECT,
         "not read by the authors' code: the adapter runs in the generator's dtype (bfloat16)",
         "no effect here: the adapter computes in dtype (bfloat16 in this translation)"),
)
# fmt: on

RULE_BY_KEY = {r.key: r for r in RULES}
