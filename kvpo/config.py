"""Trainer configuration: one dataclass, YAML files and ``key=value`` overrides.

Key names follow the LongLive / MemFlow KVPO YAML files (``K``, ``m_nearest_frames``,
``perturb_num_blocks``, ``model_kwargs.local_attn_size``, ``adapter.rank``, ...) where they mean
the same thing; the defaults are the built-in toy run (``python -m kvpo.train`` with no
arguments). Nested keys are dotted on the command line: ``adapter.rank=8``. Values from YAML and
overrides are coerced to the field's type (``lr=1e-4`` is a float even though YAML reads it as a
string); an unknown key is an error that names the closest known key.

This module only parses and type-checks; :mod:`kvpo.config_checks` validates a parsed config
against the files and the routing geometry before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work starts."""


def _f(default, help: str, group: str | None = None):
    """A dataclass field with help text (``group`` starts a new section in ``--help``)."""
    meta = {"help": help, "group": group}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return dict(value) if isinstance(value, dict) else value


@dataclass
class ModelKwargs:
    """Cache geometry of the causal model (LongLive's ``model_kwargs``)."""

    local_attn_size: int = _f(9, "frames a block attends to, sink and current block included")
    sink_size: int = _f(3, "first frames kept in the cache forever (the attention sink)")
    timestep_shift: float = _f(1.0, "flow-matching time shift of the sampler's schedule")


@dataclass
class AdapterConfig:
    """LoRA adapter (peft) trained by KVPO (LongLive's ``adapter``)."""

    type: str = _f("lora", "adapter type; only 'lora'")
    rank: int = _f(16, "LoRA rank (method default 256 for Wan-1.3B)")
    alpha: float = _f(16.0, "LoRA alpha (scale alpha / rank)")
    dropout: float = _f(0.0, "LoRA dropout")
    target_modules: list[str] = _f(
        [], "module names LoRA wraps; empty = the model's attention and FFN linears"
    )


@dataclass
class RewardComponent:
    """One weighted reward component (a key of the reward model's output dict)."""

    name: str = _f("", "component name as returned by the reward model")
    weight: float = _f(1.0, "weight in the advantage sum")


TOY_REWARDS = [
    RewardComponent("text_alignment", 1.0),
    RewardComponent("motion_quality", 1.0),
    RewardComponent("visual_quality", 1.0),
]


@dataclass
class TrainConfig:
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
    wan_model_path: str | None = _f(
        None,
        "Wan2.1 directory (diffusers layout: text_encoder/, tokenizer/, vae/) for a Wan "
        "generator_ckpt; local files only",
    )
    device: str = _f("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    dtype: str = _f("float32", "compute dtype: float32, bfloat16 or float16")
    kernel_backend: str = _f("auto", "kvpo_kernels backend: auto, torch, triton or cpp")
    cpu_threads: int = _f(
        0,
        "torch intra-op threads on CPU; 0 = torch's default (1 is faster on shared cores)",
    )
    denoising_step_list: list[int] = _f([1000, 750, 500, 250], "few-step sampler timesteps")
    warp_denoising_step: bool = _f(True, "map the timesteps through the shifted schedule")
    sampler_rule: str = _f(
        "euler", "'x0' (re-noise x0_hat: the distilled models) or 'euler' (the toy model's ODE)"
    )
    num_frame_per_block: int = _f(3, "latent frames generated per block")
    context_noise: int = _f(0, "timestep of the context pass that writes a block's K/V")
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
    # exploration
    K: int = _f(8, "G: routed branches per group (plus one unrouted anchor)", "exploration (CHR)")
    m_nearest_frames: int = _f(4, "nearest frames kept in every routed context (block included)")
    perturb_num_blocks: int = _f(2, "P: consecutive routed blocks")
    perturb_within_first_x_chunks: int = _f(7, "the routed window starts in these first chunks")
    routing_mode: str = _f(
        "dispersed", "'dispersed' (slices of one permutation, reference) or 'independent'"
    )
    row_micro_batch: int = _f(0, "rows (branches + anchor) per forward; 0 = all at once")
    # rewards and advantages
    reward_model: str = _f("toy", "reward model name (kvpo.rewards registry)", "rewards")
    reward_components: list[RewardComponent] = _f(TOY_REWARDS, "weighted reward components")
    train_local: bool = _f(True, "use the local reward (the forked chunk)")
    train_global: bool = _f(True, "use the global reward (one clip per prompt segment)")
    long_reward_normal_clip_len: int = _f(
        0, "frames of each global per-segment clip, centred in the segment; 0 = whole segment"
    )
    advantage_mode: str = _f("anchor", "'anchor' (KVPO) or 'grpo' (group mean)")
    advantage_fusion_mode: str = _f("std", "per-signal scaling before fusion: std, none, zscore")
    advantage_fusion_local_weight: float = _f(1.0, "weight of the local advantage")
    advantage_fusion_global_weight: float = _f(0.5, "weight of the global advantage")
    adv_clip_max: float = _f(2.5, "clip of the fused advantage (0 = off)")
    # policy
    tau: float = _f(2.0, "temperature of the branch softmax: logit = -E / tau", "policy (TVE)")
    tve_step_weight: str = _f("sigma2", "w_s of the energy: 'sigma2' (x0 MSE) or 'uniform'")
    log_prob_grad_steps: int = _f(2, "denoising steps replayed with gradient (the first ones)")
    policy_window_frames: int = _f(0, "frames whose energy forms pi; 0 = the routed window")
    clip_range_low: float = _f(0.1, "ratio clip below: 1 - clip_range_low")
    clip_range_high: float = _f(0.2, "ratio clip above: 1 + clip_range_high")
    log_ratio_clamp: float = _f(20.0, "clamp of the log ratio")
    kl_coef: float = _f(10.0, "coefficient of the discrete KL to the reference policy")
    kl_reference_initial: bool = _f(True, "KL reference: initial model (True) or old policy")
    ppo_epochs: int = _f(1, "updates per rollout")
    gradient_checkpointing: bool = _f(False, "recompute grad-carrying replay forwards")
    # optimisation
    lr: float = _f(
        1e-4, "AdamW learning rate (method: 1e-5 at rank 256 on Wan-1.3B)", "optimisation"
    )
    lr_scheduler: str = _f("constant_with_warmup", "constant, constant_with_warmup, cosine, linear")
    lr_warmup_steps: int = _f(5, "linear warmup steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0 = off)")
    ema_decay: float = _f(0.999, "EMA of the trainable weights (0 = off)")
    sync_every: int = _f(
        2, "old policy re-synced every N rollouts (the reference's gradient_accumulation_steps)"
    )
    max_train_steps: int = _f(100, "training steps (one group per rank each)")
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
        25, "write the group's videos as a GIF every N steps (0 = never)"
    )
    tensorboard: bool = _f(False, "also log to TensorBoard (needs the tensorboard package)")
    show_progress: bool = _f(True, "tqdm progress bars")

    @property
    def resident_frames(self) -> int:
        return self.model_kwargs.local_attn_size + self.slice_last_frames

    @property
    def switch_frames(self) -> list[int]:
        return parse_int_list(self.switch_frame_indices, "switch_frame_indices")

    @property
    def reward_weights(self) -> dict[str, float]:
        return {c.name: c.weight for c in self.reward_components}

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


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type coercion


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key of ``cls``."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, prefix + f.name + ".")
    return keys


def _unknown(key: str, cls, prefix: str) -> ConfigError:
    known = all_keys(cls, prefix)
    close = difflib.get_close_matches(prefix + key, known, n=1, cutoff=0.5)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = difflib.get_close_matches((prefix + key).lower(), list(lowered), n=1, cutoff=0.4)
        close = [lowered[c] for c in close]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {prefix + key!r}{hint} (see --help for all keys)")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(value, hint, prefix=key + ".")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError as err:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from err
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key} must be a number, got {value!r}") from err
    if hint is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def from_dict(data: dict, cls=TrainConfig, prefix: str = ""):
    """Build ``cls`` from a (nested) dict; unknown keys raise with the closest known key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(str(key), cls, prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set ``key=value`` strings (dotted keys for nested fields) into a nested dict copy."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override must look like key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts, cls, node = key.split("."), TrainConfig, data
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise _unknown(part, cls, ".".join(parts[:i]) + ("." if i else ""))
            hint = _hints(cls)[part]
            if i == len(parts) - 1:
                try:
                    node[part] = yaml.safe_load(text) if text.strip() else ""
                except yaml.YAMLError as err:
                    raise ConfigError(f"{key}: cannot read the value {text!r} ({err})") from err
            elif dataclasses.is_dataclass(hint):
                node = node.setdefault(part, {})
                cls = hint
            else:
                raise ConfigError(f"{'.'.join(parts[: i + 1])} has no sub-keys (got {key!r})")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    return from_dict(apply_overrides(data, overrides or []))


def help_text() -> str:
    """Every key with its type, default and meaning, grouped (the ``--help`` epilog)."""
    lines = []

    def walk(cls, prefix):
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("group"):
                lines.append(f"\n{f.metadata['group']}:")
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if hint == list[RewardComponent]:
                default = ", ".join(f"{c.name}:{c.weight:g}" for c in default)
            name = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
            name = name or str(hint).replace("kvpo.config.", "")
            lines.append(f"  {prefix + f.name} ({name}, default {default!r})")
            lines.append(f"      {f.metadata['help']}")

    walk(TrainConfig, "")
    return "\n".join(lines)
