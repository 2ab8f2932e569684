"""Config parsing: YAML + overrides, coercion, unknown keys with suggestions, round trips."""

from pathlib import Path

import pytest
import yaml

from kvpo.training.config import ConfigError, TrainConfig
from kvpo.training.config_parse import all_keys, help_text, load_config
from kvpo.training.validation import validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 as a string; the field type makes it a float
    path.write_text("lr: 1e-4\nK: 4\nadapter:\n  rank: 8\nmodel_kwargs:\n  sink_size: 2\n")
    cfg = load_config(path, ["K=6", "adapter.alpha=32", "data_path=none"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.K == 6 and cfg.adapter.rank == 8 and cfg.adapter.alpha == 32.0
    assert cfg.model_kwargs.sink_size == 2 and cfg.model_kwargs.local_attn_size == 9
    assert cfg.data_path is None
    assert TrainConfig().K == 8  # defaults are not mutated by a load


def test_round_trip(tmp_path):
    cfg = load_config(None, ["denoising_step_list=[1000, 500]", "reward_components=[]"])
    cfg.save(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and again.denoising_step_list == [1000, 500]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lrr=1"], "unknown config key 'lrr'; did you mean 'lr'?"),
        (["k=4"], "unknown config key 'k'; did you mean 'K'?"),
        (["adapter.rnak=4"], "did you mean 'adapter.rank'?"),
        (["perturb_num_block=3"], "did you mean 'perturb_num_blocks'?"),
        (["lr=fast"], "lr must be a number, got 'fast'"),
        (["K=2.5"], "K must be an integer, got 2.5"),
        (["train_local=maybe"], "train_local must be true or false"),
        (["lr.x=1"], "lr has no sub-keys"),
        (["K"], "override must look like key=value"),
        (["denoising_step_list=[1000,"], "denoising_step_list: cannot read the value '[1000,'"),
    ],
)
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_kwargs:\n  sink_sise: 3\n")
    with pytest.raises(
        ConfigError, match="'model_kwargs.sink_sise'; did you mean 'model_kwargs.sink_size'"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_help_lists_every_key():
    text = help_text()
    for key in all_keys():
        if key not in ("model_kwargs", "adapter"):
            assert f"  {key} (" in text, key


@pytest.mark.parametrize("name", ["toy.yaml", "longlive.yaml", "memflow.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(CONFIGS / name)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    expected_k = raw.get("K", TrainConfig().K)
    assert cfg.to_dict()["K"] == expected_k
    if name == "toy.yaml":
        assert cfg == TrainConfig(), "configs/toy.yaml must state the built-in defaults"
        assert raw == TrainConfig().to_dict(), "configs/toy.yaml must state every key"


def _problems(tmp_path, overrides, resume=None):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, overrides), resume=resume)
    return str(err.value)


def test_validate_defaults_pass():
    validate(TrainConfig())


def test_validate_reports_every_problem_before_work(tmp_path):
    text = _problems(
        tmp_path, ["generator_ckpt=/no/such/model.pt", "K=1", "lr=0", "dtype=fp8"], resume="/no/run"
    )
    for expected in (
        "generator_ckpt: checkpoint path '/no/such/model.pt' does not exist",
        "K (branches per group) must be >= 2, got 1",
        "lr must be > 0",
        "dtype must be one of",
        "--resume: no checkpoint at '/no/run'",
    ):
        assert expected in text


def test_validate_routing_that_cannot_fit():
    # a 10-frame resident cache holds no routable frame older than the window
    text = _problems(None, ["slice_last_frames=1"])
    assert "routing cannot fit the resident cache" in text and "n_random=2" in text
    assert "n_random = local_attn_size - sink_size - m_nearest_frames = 9 - 3 - 6 = 0" in (
        _problems(None, ["m_nearest_frames=6"])
    )
    assert "switch_frame_indices [40] must be increasing block starts" in _problems(
        None, ["switch_frame_indices=40"]
    )


def test_validate_recache_rule():
    text = _problems(None, ["recache_rule=memflow", "recache_full_kv_cache_after_switch=true"])
    assert "recache_rule 'memflow' re-encodes the last local_attn_size frames" in text
    assert "recache_rule must be one of ('longlive', 'memflow'), got 'causal'" in _problems(
        None, ["recache_rule=causal"]
    )
    cfg = load_config(None, ["recache_rule=memflow"])
    validate(cfg)
    assert cfg.cache_policy().recache_rule == "memflow" and TrainConfig().recache_rule == "longlive"


def test_validate_gate_and_energy_keys():
    text = _problems(
        None,
        ["min_update_entropy_ratio=1.5", "tve_step_weight=floored", "energy_blocks=window",
         "protect_mode=mechanism_1"],
    )  # fmt: skip
    for expected in (
        "min_update_entropy_ratio must be in [0, 1], got 1.5",
        "tve_step_weight 'floored' needs tve_sigma_floor > 0, got 0.0",
        "energy_blocks must be one of ('chunk', 'routed'), got 'window'",
        "protect_mode must be one of ('gate', 'skip'), got 'mechanism_1'",
    ):
        assert expected in text, expected
    validate(load_config(None, ["tve_step_weight=floored", "tve_sigma_floor=0.7"]))
