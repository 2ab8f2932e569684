"""The KVPO authors' training YAML files load unchanged (kvpo.training.authors).

The fixtures hold every key and value of the authors' ``configs/train_kvpo_longlive.yaml`` and
``configs/train_kvpo_memflow.yaml``; the expected values below are written out from those
files, converted by hand.
"""

from pathlib import Path

import pytest
import yaml

from kvpo.training import authors
from kvpo.training.authors import (
    MAPPED,
    NO_EFFECT,
    NOT_IMPLEMENTED,
    RULE_BY_KEY,
    RULES,
    flatten,
    is_authors_format,
    mapping_table,
    pattern,
    translate,
)
from kvpo.training.config import ConfigError
from kvpo.training.config_parse import load_config
from kvpo.training.validation import validate

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "authors"
LONGLIVE = FIXTURES / "train_kvpo_longlive.yaml"
MEMFLOW = FIXTURES / "train_kvpo_memflow.yaml"
PREFIX = "authors' config: "

# keys with no effect here, each printed on one line of its own (multinode: one line)
NO_EFFECT_LONGLIVE = [
    "eval_parallel_online_ema", "eval_parallel_online_ema_mode",
    "long_reward_normal_weight", "long_reward_transition_weight",
    "long_reward_transition_clip_len", "num_gpus", "gpu_ids",
    "offload_models", "debug_save_first_video_group", "debug_video_group_fps",
    "debug_video_group_subdir", "adapter.verbose", "policy_window_frames",
    "policy_window_multiple",
]  # fmt: skip
NO_EFFECT_MEMFLOW = NO_EFFECT_LONGLIVE + ["log_interval", "adapter.dtype"]
MULTINODE = [
    "multinode.nodes.node0.ssh_host", "multinode.nodes.node0.ssh_port",
    "multinode.nodes.node0.ssh_user", "multinode.nodes.node1.ssh_host",
    "multinode.nodes.node1.ssh_port", "multinode.nodes.node1.ssh_user",
    "multinode.master", "multinode.workers",
]  # fmt: skip


def _raw(path):
    return yaml.safe_load(path.read_text())


def _write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _lines(err: str) -> list[str]:
    return [line[len(PREFIX) :] for line in err.splitlines() if line.startswith(PREFIX)]


def test_fixtures_are_detected_and_ours_are_not():
    assert is_authors_format(_raw(LONGLIVE)) and is_authors_format(_raw(MEMFLOW))
    for name in ("longlive.yaml", "memflow.yaml", "toy.yaml"):  # this project's restatements
        assert not is_authors_format(_raw(ROOT / "configs" / name)), name
    assert is_authors_format({"K": 8, "adapter": {"verbose": False}})  # one of only their keys
    assert not is_authors_format({"K": 8, "adapter": {"rank": 4}})


def test_longlive_loads_with_their_values(capsys):
    cfg = load_config(LONGLIVE)
    # values of train_kvpo_longlive.yaml, in this project's keys
    assert cfg.generator_ckpt == "checkpoints/longlive/models/longlive_base.pt"
    assert cfg.lora_ckpt == "checkpoints/longlive/models/lora.pt"
    assert cfg.data_path == "prompts/vidprom_filtered_extended_switch_2.0_formatted.txt"
    assert cfg.denoising_step_list == [1000, 750, 500, 250] and cfg.warp_denoising_step
    assert (cfg.model_kwargs.local_attn_size, cfg.model_kwargs.sink_size) == (12, 3)
    assert cfg.model_kwargs.timestep_shift == 5.0 and cfg.num_frame_per_block == 3
    assert (cfg.slice_last_frames, cfg.context_noise) == (21, 0)
    assert (cfg.streaming_max_length, cfg.streaming_chunk_size, cfg.streaming_min_new_frame) == (
        147, 21, 18,
    )  # fmt: skip
    assert cfg.switch_frame_indices == "39, 75, 111" and cfg.switch_frames == [39, 75, 111]
    assert (cfg.K, cfg.m_nearest_frames, cfg.perturb_num_blocks) == (8, 4, 5)
    assert cfg.perturb_within_first_x_chunks == 7 and cfg.row_micro_batch == "auto"
    assert cfg.train_local and cfg.train_global and cfg.advantage_fusion_mode == "std"
    assert (cfg.advantage_fusion_local_weight, cfg.advantage_fusion_global_weight) == (1.0, 0.5)
    assert cfg.adv_clip_max == 2.5 and cfg.policy_window_frames == 0
    assert cfg.log_prob_grad_steps == 2 and cfg.ppo_epochs == 1
    assert (cfg.tve_step_weight, cfg.tau) == ("sigma2", 2.0)  # floor 1.0: -x0 MSE / 2
    assert cfg.gated_scale == 0.5 and cfg.protect_mode == "gate"  # mechanism_2
    assert cfg.min_update_entropy_ratio == 0 and not cfg.use_raw_weighted_reward_advantage
    assert cfg.energy_blocks == "chunk"  # their energy: the fork chunk's blocks from the fork
    assert (cfg.clip_range_low, cfg.clip_range_high) == (0.1, 0.2)
    assert cfg.kl_coef == 10.0 and cfg.kl_reference_initial
    assert cfg.lr == 1.0e-5 and cfg.lr_scheduler == "constant_with_warmup"
    assert cfg.weight_decay == 0.01 and cfg.max_grad_norm == 1.0 and cfg.ema_decay == 0.999
    # their gradient_accumulation_steps 2 is the sync period; their step is 2 rollouts
    assert cfg.sync_every == 2
    assert (cfg.max_train_steps, cfg.lr_warmup_steps) == (1500, 5)  # training steps, as theirs
    assert (cfg.save_interval_steps, cfg.eval_interval_steps) == (2, 2)
    assert cfg.eval_prompts == 8 and cfg.eval_seeds == 1 and cfg.eval_use_ema  # world_size = 8
    assert cfg.seed == 42
    assert [(c.name, c.weight) for c in cfg.reward_components] == [("video_hpsv3", 1.0)]
    assert cfg.reward_model == "video_hpsv3" and cfg.long_reward_normal_clip_len == 36
    assert [(c.name, c.weight) for c in cfg.eval_reward_components] == [("video_hpsv3", 1.0)]
    assert cfg.reward_videos_per_call == 4  # their reward_batch_size: videos per scorer call
    assert cfg.gradient_checkpointing and cfg.output_dir == "logs/longlive" and cfg.run_name == ""
    assert (cfg.adapter.type, cfg.adapter.rank, cfg.adapter.alpha) == ("lora", 256, 256.0)
    assert cfg.adapter.dropout == 0.0 and cfg.lora_ckpt_alpha == 256.0
    assert (cfg.sampler_rule, cfg.dtype) == ("x0", "bfloat16")
    assert cfg.wan_model_path == "wan_models/Wan2.1-T2V-1.3B"
    assert (cfg.prompt_min_segments, cfg.prompt_max_segments, cfg.prompt_order) == (4, 4, "sweep")
    assert capsys.readouterr().err.startswith(
        f"authors' config {LONGLIVE}: the KVPO authors' format, translated: 78 mapped, "
        "22 no effect here, 0 not implemented here"
    )
    # their trainer keeps training the loaded LoRA; try_kl is off, its M is theirs
    assert cfg.lora_init == "continue"
    assert (cfg.kl_loss_mode, cfg.anchor_grad_steps) == ("discrete_kl", 1)


def test_memflow_loads_with_their_values(capsys):
    cfg = load_config(MEMFLOW)
    assert cfg.generator_ckpt == "checkpoints/memflow/base.pt"
    assert cfg.m_nearest_frames == 3  # MemFlow's rule: 12 - 3 = 9 routed cache slots
    assert (cfg.model_kwargs.bank_size, cfg.model_kwargs.record_interval) == (3, 3)
    assert cfg.routing_rule == "memflow" and cfg.recache_rule == "memflow"
    assert cfg.cache_policy().bank_size == 3 and cfg.cache_policy().recache_rule == "memflow"
    assert not cfg.model_kwargs.sma and not cfg.cache_policy().sma  # their SMA: False
    assert cfg.row_micro_batch == 4  # branch_backward_chunk_size 4
    assert cfg.output_dir == "logs/memflow" and cfg.sync_every == 2
    assert (cfg.adapter.rank, cfg.adapter.alpha) == (256, 256.0)
    first = capsys.readouterr().err.splitlines()[0]
    assert "81 mapped, 24 no effect here, 0 not implemented here" in first
    # the rest as LongLive's file: the two files differ in these keys only
    longlive = load_config(LONGLIVE)
    differ = {k for k, v in cfg.to_dict().items() if longlive.to_dict()[k] != v}
    assert differ == {"generator_ckpt", "lora_ckpt", "m_nearest_frames", "row_micro_batch",
                      "output_dir", "model_kwargs", "routing_rule", "recache_rule"}  # fmt: skip
    assert longlive.routing_rule == "longlive" and longlive.model_kwargs.bank_size == 0
    assert longlive.recache_rule == "longlive"


def test_the_translation_passes_validation_apart_from_missing_paths():
    for path in (LONGLIVE, MEMFLOW):
        cfg = load_config(path, ["generator_ckpt=", "lora_ckpt=", "data_path=none"])
        validate(cfg)  # layout, routing geometry, ranges and choices are all valid


def test_every_key_of_both_files_is_in_the_table():
    seen = set()
    for path in (LONGLIVE, MEMFLOW):
        data = _raw(path)
        leaves = [key for key, _ in flatten(data)]
        assert len(leaves) == {LONGLIVE: 100, MEMFLOW: 105}[path]
        translation = translate(data)
        rows = {row.key: row for row in translation.rows if row.present}
        assert set(rows) == set(leaves)
        for key in leaves:
            spelling = pattern(key)
            assert spelling in RULE_BY_KEY, key
            seen.add(spelling)
        table = mapping_table(translation, path)
        for key in leaves:
            assert f"  {key} " in table, key
        assert sum(translation.counts().values()) == len(leaves)
    # and the table holds no key that neither file has, but the launcher's ssh spellings and the
    # keys only their trainer reads (getattr with a default)
    spare = {r.key for r in RULES} - seen
    launcher = {f"multinode.nodes.<alias>.{k}" for k in ("host", "hostname", "port", "user")}
    assert spare == launcher | {"recache_full_kv_cache_after_switch"}
    assert spare == authors.LAUNCHER_SPELLINGS | authors.TRAINER_ONLY
    memflow_only = {pattern(k) for k, _ in flatten(_raw(MEMFLOW))} - {
        pattern(k) for k, _ in flatten(_raw(LONGLIVE))
    }
    assert memflow_only == authors.MEMFLOW_ONLY


def test_rule_categories():
    counts = authors.rule_counts()
    assert counts == {MAPPED: 82, NO_EFFECT: 25, NOT_IMPLEMENTED: 0}
    for key in ("offload_models", "num_gpus", "gpu_ids", "adapter.verbose", "multinode.master",
                "policy_window_frames", "policy_window_multiple"):  # fmt: skip
        assert RULE_BY_KEY[key].kind == NO_EFFECT, key
    for key in ("prompt_min_segments", "prompt_max_segments", "data_path",
                "use_raw_weighted_reward_advantage", "min_update_entropy_ratio",
                "model_kwargs.bank_size", "model_kwargs.record_interval",
                "model_kwargs.SMA"):  # fmt: skip
        assert RULE_BY_KEY[key].kind == MAPPED, key


def test_no_effect_keys_print_one_line_each(capsys):
    load_config(MEMFLOW)
    lines = _lines(capsys.readouterr().err)
    for key in NO_EFFECT_MEMFLOW:
        mine = [line for line in lines if line.startswith(f"{key}: ")]
        assert len(mine) == 1, (key, mine)
        assert ": accepted, no effect here" in mine[0], mine[0]
    assert "offload_models: True: accepted, no effect here: the old policy and the KL " in (
        "\n".join(lines)
    )
    assert "num_gpus: 8: accepted, no effect here: launch torchrun --nproc_per_node N" in (
        "\n".join(lines)
    )
    group = [line for line in lines if line.startswith("multinode (")]
    assert len(group) == 1 and all(key in group[0] for key in MULTINODE)
    assert "no effect here: the multi-node launcher's ssh targets" in group[0]
    # mapped (SMA: False maps to model_kwargs.sma): silent
    for key in ["model_kwargs.SMA", "model_kwargs.bank_size",
                "model_kwargs.record_interval"]:  # fmt: skip
        assert not any(line.startswith(f"{key}: ") for line in lines), key
    # mapped keys print only where the conversion is not exact
    printed = {line.split(":", 1)[0] for line in lines}
    assert printed & {r.key for r in RULES if r.kind == MAPPED} == {
        "lr_warmup_steps", "ema_decay", "eval_prompts",
    }  # fmt: skip
    n_lines = len(NO_EFFECT_MEMFLOW) + 1 + 3
    assert len(lines) == n_lines


def test_not_implemented_values_are_printed_and_the_run_proceeds(tmp_path, capsys):
    data = _raw(LONGLIVE)
    data.update(
        use_raw_weighted_reward_advantage=True, global_sink=False,
        min_update_entropy_ratio=0.1, long_reward_normal_weight=0.0, last_step_only=False,
        eval_reward_components=[{"name": "video_hpsv3", "weight": 1.0},
                                {"name": "videoalign_ta", "weight": 1.0}],
    )  # fmt: skip
    data["model_kwargs"]["SMA"] = True
    cfg = load_config(_write(tmp_path, data))
    lines = _lines(capsys.readouterr().err)
    for key, text in (
        ("global_sink", "re-encodes the sink with the new prompt"),
        ("long_reward_normal_weight", "makes their global reward 0"),
        (
            "eval_reward_components",
            "which does not return ['videoalign_ta'], so it scores reward_components",
        ),
        ("last_step_only", "stops every block at one random denoising step"),
    ):
        mine = [line for line in lines if line.startswith(f"{key}: ")]
        assert len(mine) == 1 and "not implemented here" in mine[0] and text in mine[0], key
    assert cfg.kl_coef == 10.0 and cfg.train_global  # the run keeps this project's behaviour
    # implemented: mapped, silent
    assert cfg.use_raw_weighted_reward_advantage and cfg.min_update_entropy_ratio == 0.1
    assert cfg.model_kwargs.sma and cfg.cache_policy().sma  # SMA: True
    assert not any(
        line.startswith(("use_raw_weighted", "min_update_entropy", "model_kwargs.SMA"))
        for line in lines
    )


def test_try_kl_maps_onto_the_anchor_penalty(tmp_path, capsys):
    """LongLive's trainer implements try_kl (kvpo.method.anchor_kl); MemFlow's rejects it."""
    data = _raw(LONGLIVE)
    data.update(kl_loss_mode="anchor_mse", anchor_grad_steps=2)  # a spelling of try_kl
    cfg = load_config(_write(tmp_path, data))
    assert (cfg.kl_loss_mode, cfg.anchor_grad_steps, cfg.kl_coef) == ("try_kl", 2, 10.0)
    assert cfg.policy_config().kl_coef == 0.0  # no discrete KL beside it
    err = capsys.readouterr().err
    assert "kl_loss_mode" not in err and "anchor_grad_steps" not in err
    data = _raw(MEMFLOW)
    data["kl_loss_mode"] = "try_kl"
    with pytest.raises(ConfigError, match="MemFlow trainer accepts discrete_kl only"):
        load_config(_write(tmp_path, data))


def test_conversions_in_their_units(tmp_path, capsys):
    data = _raw(LONGLIVE)
    data.update(
        switch_frame_indices="40, 80", policy_window_multiple=2.0, log_prob_sigma_floor=0.5,
        per_step_protect_mode="mechanism_1", branch_backward_chunk_size=8, eval_prompts=0,
        save_interval_steps=0, save_interval_samples=32, num_gpus=8, clip_range=0.3,
    )  # fmt: skip
    del data["clip_range_low"], data["local_loss_weight"], data["advantage_fusion_local_weight"]
    cfg = load_config(_write(tmp_path, data))
    err = capsys.readouterr().err
    # chunks [0, 21), [21, 39), [39, 57), [57, 75), [75, 93), ...: switches to the next start
    assert cfg.switch_frame_indices == "57, 93"
    # their window (round(5 blocks x 3 frames x 2.0) = 30) does not choose the energy blocks
    assert cfg.policy_window_frames == 0 and cfg.energy_blocks == "chunk"
    # floor 0.5 below every step sigma (1, 0.9375, 0.8333, 0.625): -velocity MSE / 2
    assert (cfg.tve_step_weight, cfg.tau) == ("uniform", 2.0)
    assert cfg.protect_mode == "skip" and cfg.policy_config().gated_scale == 0.0  # mechanism_1
    assert "per_step_protect_mode" not in err  # exact now
    assert cfg.row_micro_batch == "auto"  # a chunk of all K branches: no chunking
    assert not cfg.eval_before and not cfg.eval_after and cfg.eval_interval_steps == 0
    assert cfg.save_interval_steps == 2  # 32 samples / (8 ranks x 2 rollouts)
    assert "save_interval_samples: 32: mapped to save_interval_steps=2, not " in err
    assert (cfg.clip_range_low, cfg.clip_range_high) == (0.3, 0.2)  # clip_range: the fallback
    assert cfg.advantage_fusion_local_weight == 1.0  # their default local_loss_weight
    data.update(log_prob_sigma_floor=0.7)  # between the sigmas: sigma^2 / max(sigma, 0.7)^2
    cfg = load_config(_write(tmp_path, data))
    assert (cfg.tve_step_weight, cfg.tve_sigma_floor, cfg.tau) == ("floored", 0.7, 2.0)
    assert "log_prob_sigma_floor" not in capsys.readouterr().err
    data.update(log_prob_sigma_floor=2.0, eval_prompts=3)  # above every sigma: tau = 2 floor^2
    cfg = load_config(_write(tmp_path, data))
    assert (cfg.tve_step_weight, cfg.tau, cfg.eval_prompts) == ("sigma2", 8.0, 3)


def test_step_counts_are_theirs():
    """A training step is sync_every rollouts here as theirs is gradient_accumulation_steps
    rollouts: the step counts carry over; the warmup runs one step ahead (printed)."""
    translation = translate(_raw(LONGLIVE))
    rows = {row.key: row.result for row in translation.rows}
    assert rows["max_train_steps"] == (
        "max_train_steps = 1500 (1500 training steps of 2 rollouts: 3000 rollouts, 3000 AdamW "
        "steps in both)"
    )
    assert rows["lr_warmup_steps"] == "lr_warmup_steps = 5 (training steps, as theirs)"
    assert rows["eval_interval_steps"] == "eval_interval_steps = 2 (2 training steps, as theirs)"
    assert any(
        "their first training step runs at LR 0 (diffusers' factor k/5 from k = 0)" in note
        for note in translation.notes
    )


def test_absent_keys_take_their_codes_defaults(tmp_path):
    data = _raw(LONGLIVE)
    for key in ("ppo_epochs", "kl_reference_initial", "adv_clip_max", "lr_warmup_steps",
                "policy_window_multiple", "ema_decay", "long_reward_normal_clip_len"):  # fmt: skip
        del data[key]
    del data["adapter"]["alpha"]
    cfg = load_config(_write(tmp_path, data))
    assert cfg.ppo_epochs == 3 and cfg.kl_reference_initial is False and cfg.adv_clip_max == 5.0
    assert cfg.lr_warmup_steps == 10  # their default, in training steps
    assert cfg.ema_decay == 0.0
    assert not cfg.eval_use_ema
    assert cfg.policy_window_frames == 0  # their default multiple 2.0 does not change the energy
    assert cfg.long_reward_normal_clip_len == 81  # 21 latent frames -> 21 x 4 - 3 pixels
    assert cfg.adapter.alpha == 256.0 and cfg.lora_ckpt_alpha == 256.0  # alpha = rank
    rows = {row.key: row for row in translate(data).rows}
    assert rows["ppo_epochs"].value == "(absent)" and not rows["ppo_epochs"].present
    assert rows["ppo_epochs"].result == "ppo_epochs = 3 (their default 3)"
    # last_step_only: their configs/default_config.yaml says false (random exit steps)
    assert "last_step_only" not in translate(data).notes[0]
    del data["last_step_only"]
    notes = translate(data).notes
    assert any(n.startswith("last_step_only: False: not implemented here") for n in notes)
    # MemFlow's trainer defaults the segment clips to 48 pixel frames, LongLive's to 81
    memflow = _raw(MEMFLOW)
    del memflow["long_reward_normal_clip_len"]
    assert translate(memflow).values["long_reward_normal_clip_len"] == 48


def test_recache_full_kv_cache_after_switch(tmp_path):
    """Their trainer's key (no file sets it): false re-encodes local_attn_size frames at a
    switch, true the whole cache, local_attn_size + slice_last_frames = 12 + 21 frames."""
    data = _raw(LONGLIVE)
    cfg = load_config(_write(tmp_path, data))
    assert cfg.recache_full_kv_cache_after_switch is False
    assert cfg.cache_policy().recache_frames(60) == range(48, 60)
    data["recache_full_kv_cache_after_switch"] = True
    cfg = load_config(_write(tmp_path, data))
    assert cfg.recache_full_kv_cache_after_switch is True
    assert cfg.cache_policy().recache_size == 33
    assert cfg.cache_policy().recache_frames(60) == range(27, 60)
    row = {r.key: r for r in translate(data).rows}["recache_full_kv_cache_after_switch"]
    assert row.present and row.kind == MAPPED
    # their MemFlow recache_after_switch never reads it: one pass over local_attn_size frames
    data = _raw(MEMFLOW)
    data["recache_full_kv_cache_after_switch"] = True
    translation = translate(data)
    row = {r.key: r for r in translation.rows}["recache_full_kv_cache_after_switch"]
    assert row.present and row.kind == NO_EFFECT
    assert any("no effect in their MemFlow pipeline" in n for n in translation.notes)
    cfg = load_config(_write(tmp_path, data))
    assert (cfg.recache_full_kv_cache_after_switch, cfg.recache_rule) == (False, "memflow")
    assert cfg.cache_policy().recache_frames(60) == range(48, 60)
