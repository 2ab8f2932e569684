"""The typed objects the method uses, built from the flat keys of a
:class:`~kvpo.training.config.TrainConfig` in one place (a base class of it)."""

from __future__ import annotations


class TypedViews:
    """``cache_policy()``, ``schedule()``, ``step_weights()``, ``routing_geometry()``,
    ``policy_frames()``, ``chunks()``, ``policy_config()``, ``advantage_config()``,
    ``exploration_config()``, ``latent_layout()``, ``global_reward()``."""

    def cache_policy(self):
        """:class:`~kvpo.models.CachePolicy`: sink + window view over the resident frames."""
        from kvpo.models.frame_cache import CachePolicy

        mk = self.model_kwargs
        recache = self.resident_frames if self.recache_full_kv_cache_after_switch else None
        return CachePolicy(
            mk.sink_size, mk.local_attn_size, self.resident_frames, self.num_frame_per_block,
            recache_size=recache, bank_size=mk.bank_size, record_interval=mk.record_interval,
            sma=mk.sma,
            recache_rule=self.recache_rule,
        )  # fmt: skip

    def schedule(self):
        """:class:`~kvpo.models.FlowSchedule` of the few-step sampler."""
        from kvpo.models.sampler import FlowSchedule

        return FlowSchedule(
            tuple(self.denoising_step_list),
            self.model_kwargs.timestep_shift,
            warp=self.warp_denoising_step,
        )

    def step_weights(self):
        """``w_s [S]`` fp32 of the energy (:func:`~kvpo.method.replay.step_weights`)."""
        from kvpo.method.replay import step_weights

        return step_weights(self.schedule(), self.tve_step_weight, self.tve_sigma_floor)

    def routing_geometry(self):
        """:class:`~kvpo.method.routing.RoutingGeometry` of the CHR plan."""
        from kvpo.method.routing import RoutingGeometry

        return RoutingGeometry(
            num_frame_per_block=self.num_frame_per_block,
            sink_size=self.model_kwargs.sink_size,
            local_attn_size=self.model_kwargs.local_attn_size,
            resident_frames=self.resident_frames,
            m_nearest_frames=self.m_nearest_frames,
            perturb_num_blocks=self.perturb_num_blocks,
        )

    def policy_frames(self, plan=None) -> int:
        """Frames from the fork whose trajectories are recorded and replayed (the energy
        blocks): ``policy_window_frames``, or when it is 0 the ``energy_blocks`` rule
        (:func:`~kvpo.method.routing.energy_frames`) for ``plan``, or without a plan the most
        it gives over every eligible start (what the cache is sized for)."""
        from kvpo.method.routing import energy_frames, max_energy_frames

        if self.policy_window_frames:
            return self.policy_window_frames
        if plan is not None:
            return energy_frames(plan, self.chunks(), self.energy_blocks)
        return max_energy_frames(
            self.routing_geometry(), self.chunks(), self.perturb_within_first_x_chunks,
            self.energy_blocks,
        )  # fmt: skip

    def chunks(self):
        """The streaming chunks of a training video (:func:`~kvpo.method.routing.chunk_layout`)."""
        from kvpo.method.routing import chunk_layout

        return chunk_layout(
            self.streaming_max_length, self.streaming_chunk_size, self.streaming_min_new_frame
        )

    def policy_config(self):
        """:class:`~kvpo.method.policy.PolicyConfig`: every constant of the objective (no
        discrete KL under ``kl_loss_mode: try_kl``, whose penalty is
        :mod:`kvpo.method.anchor_kl`)."""
        from kvpo.method.policy import PolicyConfig

        return PolicyConfig(
            tau=self.tau,
            clip_low=self.clip_range_low,
            clip_high=self.clip_range_high,
            log_ratio_clamp=self.log_ratio_clamp,
            kl_coef=self.kl_coef if self.kl_loss_mode == "discrete_kl" else 0.0,
            gated_scale=0.0 if self.protect_mode == "skip" else self.gated_scale,
            protect_mode=self.protect_mode,
            min_update_entropy_ratio=self.min_update_entropy_ratio,
        )

    def advantage_config(self):
        """:class:`~kvpo.method.advantages.AdvantageConfig` of the reward signals' fusion."""
        from kvpo.method.advantages import AdvantageConfig

        return AdvantageConfig(
            mode=self.advantage_mode,
            fusion_mode=self.advantage_fusion_mode,
            local_weight=self.advantage_fusion_local_weight,
            global_weight=self.advantage_fusion_global_weight,
            clip=self.adv_clip_max,
            raw_weighted=self.use_raw_weighted_reward_advantage,
        )

    def exploration_config(self):
        """:class:`~kvpo.method.exploration.ExplorationConfig`; raises :class:`ConfigError`
        when the exploration keys cannot run."""
        from kvpo.method.exploration import ExplorationConfig

        config = ExplorationConfig(
            mode=self.exploration,
            injection_scale=float(self.noise_injection_scale),
            inject_at_steps=tuple(int(s) for s in self.noise_inject_at_steps),
            initial_mix=float(self.initial_noise_mix),
        )
        problems = config.problems(len(self.denoising_step_list))
        if problems:
            from kvpo.training.config import ConfigError

            raise ConfigError("; ".join(problems))
        return config

    def latent_layout(self):
        """:class:`~kvpo.rewards.clips.VideoLayout` of a training video, in latent frames."""
        from kvpo.rewards.clips import VideoLayout

        return VideoLayout(self.streaming_max_length, tuple(self.switch_frames))

    def global_reward(self):
        """:class:`~kvpo.rewards.clips.GlobalReward`: the global reward's clips and weights."""
        from kvpo.rewards.clips import GlobalReward

        return GlobalReward(
            clip_len=self.long_reward_normal_clip_len,
            transition=self.long_reward_enable_transition,
            transition_clip_len=self.long_reward_transition_clip_len,
            normal_weight=self.long_reward_normal_weight,
            transition_weight=self.long_reward_transition_weight,
        )
