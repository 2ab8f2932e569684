"""The KVPO authors' YAML files: errors on bad keys and values, rank-zero printing, and
``python -m kvpo.train --check`` (the mapping table, every problem, the exit status), in process
and in a subprocess; the generated docs page."""

import json
import os

import pytest

from kvpo.train import main
from kvpo.training import authors
from kvpo.training.authors import RULES
from kvpo.training.config import ConfigError
from kvpo.training.config_parse import load_config
from tests.kvpo.test_authors_config import LONGLIVE, MEMFLOW, ROOT, _raw, _write


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"gradient_acumulation_steps": 2}, "did you mean 'gradient_accumulation_steps'?"),
        ({"offload_model": True}, "did you mean 'offload_models'?"),
        ({"adapter": {"rank": 256, "verbse": False}}, "did you mean 'adapter.verbose'?"),
        ({"multinode": {"nodes": {"n0": {"ssh_hots": "h"}}}},
         "did you mean 'multinode.nodes.<alias>.ssh_host'?"),
        ({"lr_schedular": "cosine"}, "did you mean 'lr_scheduler'?"),
    ],
)  # fmt: skip
def test_unknown_key_is_an_error_with_a_suggestion(tmp_path, edit, message):
    data = _raw(LONGLIVE)
    data.update(edit)
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert "unknown config key" in str(err.value) and message in str(err.value)


def test_bad_values_of_their_keys_are_errors(tmp_path):
    for key, value, message in (
        ("per_step_protect_mode", "mechanism_3", "accepts mechanism_1 or mechanism_2"),
        ("kl_loss_mode", "l2", "accepts discrete_kl or try_kl"),
        ("eval_prompts", "everyone", "accepts an integer or world_size"),
        ("policy_log_prob_mode", "l2_distance", "accepts only per_step"),
        ("K", "eight", "K must be an integer"),
    ):
        data = _raw(LONGLIVE)
        data[key] = value
        with pytest.raises(ConfigError, match=message):
            load_config(_write(tmp_path, data))


def test_our_keys_in_the_file_and_overrides_win(tmp_path, capsys):
    data = _raw(LONGLIVE)
    data.update(sync_every=3, tau=1.0)
    cfg = load_config(_write(tmp_path, data), ["K=4", "wan_model_path=/models/wan"])
    assert (cfg.sync_every, cfg.tau, cfg.K, cfg.wan_model_path) == (3, 1.0, 4, "/models/wan")
    err = capsys.readouterr().err
    assert "sync_every: 3: this project's key in the file overrides 2 (from " in err
    assert "tau: 1.0: this project's key in the file overrides 2.0 (from " in err
    with pytest.raises(ConfigError, match="did you mean"):  # overrides are this project's keys
        load_config(LONGLIVE, ["gradient_accumulation_steps=4"])


def test_lines_are_printed_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    load_config(LONGLIVE)
    assert capsys.readouterr().err == ""


def test_scorers_are_the_registered_ones():
    from kvpo.rewards.registry import _factory, available_rewards

    for scorer, names in authors.SCORERS.items():
        assert scorer in available_rewards(), scorer
        assert set(names) <= set(_factory(scorer).names), scorer


def test_check_prints_the_table_and_fails_on_the_missing_paths(capsys):
    # their checkpoints and prompt file are not on this machine: the table and the resolved
    # config are printed, then every problem, and the exit status is 2
    assert main(["--config", str(LONGLIVE), "--check"]) == 2
    captured = capsys.readouterr()
    head, _, resolved = captured.out.partition("\n{")
    assert head.startswith(f"KVPO authors' config {LONGLIVE} -> this project's keys:")
    for text in (
        "  gradient_accumulation_steps  ", "sync_every = 2",
        "max_train_steps = 1500 (1500 ",
        "2 rollouts: 3000 rollouts, 3000 AdamW steps in both)",
        "adapter.verbose ", "no effect here", "prompt_min_segments = 4", "prompt_max_segments = 4",
        "wan_model_path = 'wan_models/Wan2.1-T2V-1.3B'",
        "100 keys in the file: 78 mapped, 22 no effect here, 0 not implemented here",
    ):  # fmt: skip
        assert text in head, text
    assert json.loads("{" + resolved)["sync_every"] == 2
    for text in (
        "error: invalid configuration:",
        "generator_ckpt: checkpoint path 'checkpoints/longlive/models/longlive_base.pt' does not "
        "exist",
        "lora_ckpt: checkpoint path 'checkpoints/longlive/models/lora.pt' does not exist",
        "data_path: prompt file 'prompts/vidprom_filtered_extended_switch_2.0_formatted.txt' "
        "does not exist",
    ):
        assert text in captured.err, text


def test_check_passes_when_the_config_would_run(capsys):
    args = ["--config", str(LONGLIVE), "--check", "generator_ckpt=", "lora_ckpt=", "data_path="]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "100 keys in the file: 78 mapped, 22 no effect here" in captured.out
    assert "error:" not in captured.err and "invalid configuration" not in captured.err


def test_check_lists_every_problem(capsys):
    assert main(["--config", str(LONGLIVE), "--check", "K=1"]) == 2
    err = capsys.readouterr().err
    assert "K (branches per group) must be >= 2, got 1" in err
    assert "generator_ckpt: checkpoint path" in err  # every problem is listed
    assert main(["--config", str(LONGLIVE), "--check", "--resume", "/no/such/run"]) == 2
    assert "--resume: no checkpoint at '/no/such/run'" in capsys.readouterr().err


def test_subprocess_check_runs(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's kvpo, not an installed one
    run = subprocess.run(
        [sys.executable, "-m", "kvpo.train", "--config", str(MEMFLOW), "--check"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr  # their paths are not on this machine
    assert "105 keys in the file: 81 mapped, 24 no effect here, 0 not implemented here" in (
        run.stdout
    )
    assert "model_kwargs.sma = False" in run.stdout
    assert "model_kwargs.bank_size" not in run.stderr  # mapped: nothing printed
    assert "generator_ckpt: checkpoint path 'checkpoints/memflow/base.pt' does not exist" in (
        run.stderr
    )


def test_docs_page_is_generated():
    page = ROOT / "docs" / "authors-config.md"
    assert page.read_text() == authors.markdown(), (
        "regenerate: python -m kvpo.training.authors --markdown > docs/authors-config.md"
    )
    text = page.read_text()
    for rule in RULES:
        assert f"| `{rule.key}` |" in text, rule.key
