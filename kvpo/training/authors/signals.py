"""Translation of the authors' reward, advantage and policy keys."""

from __future__ import annotations

from kvpo.training.authors.keys import MEMFLOW_MODEL
from kvpo.training.authors.rule import NO_EFFECT
from kvpo.training.authors.translation import Translator
from kvpo.training.authors.values import choice, integer
from kvpo.training.config import ConfigError

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

# the spellings of the values their code accepts for its policy, protect and KL modes
POLICY_MODES = {"per_step": ("per_step", "per_step_x", "perstep", "perstep_x")}
PROTECT_MODES = {
    "mechanism_1": ("mechanism_1", "m1", "reward_gate"),
    "mechanism_2": ("mechanism_2", "m2", "anchor_entropy"),
}
KL_MODES = {
    "discrete_kl": ("discrete_kl", "discrete-kl", "distribution", "pi_kl", "branch_discrete_kl"),
    "try_kl": ("try_kl", "try-kl", "anchor_l2", "anchor_mse", "ref_anchor_l2"),
}


def translate_advantages(t: Translator) -> None:
    """The two signals and how their advantages are fused."""
    t.copy("train_local", "train_global", "advantage_fusion_mode")
    for side in ("local", "global"):
        t.fallback(f"{side}_loss_weight", f"advantage_fusion_{side}_weight")
    t.copy("adv_clip_max")


def translate_policy(t: Translator) -> None:
    """The branch policy, its protect mode, the ratio clip and the KL term."""
    accepts = "only per_step (alias per_step_x), the policy implemented here"
    choice(t.value("policy_log_prob_mode"), "policy_log_prob_mode", POLICY_MODES, accepts)
    t.row("policy_log_prob_mode", "the TVE policy (the only one here)")
    t.copy("log_prob_grad_steps")
    _sigma_floor(t)
    protect = choice(t.value("per_step_protect_mode"), "per_step_protect_mode", PROTECT_MODES)
    if protect == "mechanism_2":
        t.set("protect_mode", "gate", "per_step_protect_mode")
        t.set("gated_scale", 0.5, "per_step_protect_mode")
        t.row(
            "per_step_protect_mode",
            "protect_mode = 'gate', gated_scale = 0.5 (their 1 - pi_anchor with an anchor logit "
            "of 0 beside the branch log-softmax: exactly 1/2)",
        )
        t.copy("min_update_entropy_ratio")
    else:
        t.set("protect_mode", "skip", "per_step_protect_mode")
        t.row(
            "per_step_protect_mode",
            "protect_mode = 'skip' (zero loss where no branch beats the anchor; the update is "
            "skipped when no rank has one)",
        )
        if t.has("min_update_entropy_ratio"):
            t.row("min_update_entropy_ratio", "no effect here: read by mechanism_2 only", NO_EFFECT)
    t.copy("ppo_epochs")
    t.fallback("clip_range", "clip_range_low", "clip_range_high")
    t.copy("kl_coef")
    kl = choice(t.value("kl_loss_mode"), "kl_loss_mode", KL_MODES)
    if kl == "try_kl" and any(t.has(k) for k in MEMFLOW_MODEL):
        raise ConfigError(
            "kl_loss_mode 'try_kl': the authors' MemFlow trainer accepts discrete_kl only"
        )
    t.set("kl_loss_mode", kl, "kl_loss_mode")
    t.row("kl_loss_mode", f"kl_loss_mode = {kl!r}")
    t.copy("anchor_grad_steps")
    t.copy("kl_reference_initial")


def sigmas(steps: list[int], shift: float, warp: bool) -> list[float]:
    """Noise levels of the steps (docs/method.md section 1)."""
    out = []
    for step in steps:
        u = step / 1000
        out.append(shift * u / (1 + (shift - 1) * u) if warp else u)
    return out


def _sigma_floor(t: Translator) -> None:
    """Their per-step weight ``sigma^2 / max(sigma, floor)^2`` on the velocity error, with their
    ``-1/2``: ``tve_step_weight`` and ``tau`` (``sigma2`` with ``tau = 2 floor^2`` when the floor is
    above every step's sigma, ``uniform`` when below, ``floored`` in between)."""
    key = "log_prob_sigma_floor"
    floor = t.value(key)
    steps = t.values.get("denoising_step_list") or [1000, 750, 500, 250]
    shift = t.values.get("model_kwargs", {}).get("timestep_shift") or 1.0
    sig = sigmas(steps, shift, bool(t.values.get("warp_denoising_step")))
    rounded = [round(s, 4) for s in sig]
    if floor >= max(sig) - 1e-9:
        weight, tau = "sigma2", 2 * floor**2
    elif floor <= min(sig):
        weight, tau = "uniform", 2.0
    else:
        weight, tau = "floored", 2.0
        t.set("tve_sigma_floor", floor, key)
    t.set("tve_step_weight", weight, key)
    t.set("tau", tau, key)
    floored = f", tve_sigma_floor = {floor!r}" if weight == "floored" else ""
    t.row(key, f"tve_step_weight = {weight!r}{floored}, tau = {tau!r} (step sigmas {rounded})")


def _eval_components(t: Translator) -> None:
    """``eval_reward_components``, where the scorer chosen for ``reward_components`` returns
    them (the evaluation here scores with that one scorer)."""
    evals = t.value("eval_reward_components")
    if evals is None:
        return
    scorer = t.values.get("reward_model")
    names = [c["name"] for c in evals]
    missing = [n for n in names if n not in SCORERS.get(scorer, ())]
    if missing:
        t.unsupported(
            "eval_reward_components",
            f"not implemented here: reward_model {scorer!r} does not return {missing}",
            f"their held-out evaluation scores {names}; here it scores with reward_model "
            f"({scorer!r}), which does not return {missing}, so it scores reward_components",
        )
        return
    t.set("eval_reward_components", evals, "eval_reward_components")
    t.row("eval_reward_components", f"eval_reward_components = {evals!r}")


def translate_rewards(t: Translator) -> None:
    """The reward components and scorer, and the clips of the global reward."""
    comps = t.value("reward_components")
    if comps is None:
        t.row("reward_components", "reward_components: this project's default")
    else:
        t.set("reward_components", comps, "reward_components")
        names = [c["name"] for c in comps]
        scorer = next((s for s, out in SCORERS.items() if all(n in out for n in names)), None)
        result = f"reward_components = {comps!r}"
        if scorer is not None:
            t.set("reward_model", scorer, "reward_components")
            t.row("reward_components", f"{result}, reward_model = {scorer!r}")
        else:
            t.set("reward_model", names[0], "reward_components")
            t.row("reward_components", f"{result}, reward_model = {names[0]!r} (printed)")
            t.note(
                "reward_components",
                f"not implemented here: no scorer registered here returns all of {names}; "
                "register one that does (kvpo.rewards.register_reward) and set reward_model to it",
            )
    t.copy("use_raw_weighted_reward_advantage")
    _eval_components(t)
    videos = max(0, t.value("reward_batch_size"))
    t.set("reward_videos_per_call", videos, "reward_batch_size")
    t.row("reward_batch_size", f"reward_videos_per_call = {videos}")
    stride = t.value("vae_temporal_stride")
    if stride == 4:
        t.row("vae_temporal_stride", "4, fixed here (the Wan VAE)")
    else:
        t.unsupported(
            "vae_temporal_stride",
            f"not implemented here ({stride})",
            "the Wan VAE here makes 4 pixel frames per latent frame; the run proceeds with 4",
        )
    t.switch(
        "long_reward_enable_normal",
        "the global reward here (one clip per segment)",
        "with no segment clips their global reward is 0 for every video; here the global reward "
        "is scored (train_global=false drops it); the run proceeds",
    )
    key = "long_reward_enable_transition"
    t.set(key, False, key)
    t.row(key, f"{key} = False")
    if t.has(key) and t.value(key):
        t.inexact(
            key,
            f"{key}=False",
            "their trainers' clip builder (_build_global_segment_clip_specs) adds no transition "
            "clips whatever this says, so their global reward scores the segment clips only; "
            "so does this run",
        )
    memflow = any(t.has(k) for k in MEMFLOW_MODEL)
    default_clip = 48 if memflow else 21 * stride - (stride - 1)  # LongLive: 21 latent frames
    clip = integer(
        t.leaves.get("long_reward_normal_clip_len", default_clip), "long_reward_normal_clip_len"
    )
    t.set("long_reward_normal_clip_len", max(1, clip), "long_reward_normal_clip_len")
    t.row("long_reward_normal_clip_len", f"long_reward_normal_clip_len = {max(1, clip)}")
