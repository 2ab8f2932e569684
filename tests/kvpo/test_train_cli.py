"""``python -m kvpo.train`` from the command line: help, bad input rejected before any work, and a
run end to end on random tiny weights (metrics, saved config, summary, plots, samples, adapter)."""

import json

import pytest
import torch
import yaml
from PIL import Image

from kvpo.train import main
from kvpo.training.config_parse import load_config
from tests.kvpo.trainer_fixtures import tiny_args, tiny_generator_dir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_help_explains_every_key(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for text in ("--config", "--resume", "key=value", "K (int, default 8)", "adapter.rank (int"):
        assert text in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generator_ckpt=/no/such/dir"], "checkpoint path '/no/such/dir' does not exist"),
        (["perturb_num_blcks=2"], "did you mean 'perturb_num_blocks'?"),
        (["slice_last_frames=0"], "routing cannot fit the resident cache"),
        (["--resume", "/no/such/run"], "--resume: no checkpoint at '/no/such/run'"),
    ],
)
def test_bad_input_fails_before_work(tmp_path, capsys, args, message):
    assert main([*args, f"output_dir={tmp_path / 'runs'}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_check_prints_the_config_then_every_problem(tmp_path, capsys):
    runs = f"output_dir={tmp_path / 'runs'}"
    assert main(["--check", "K=1", "generator_ckpt=/no/such/dir", runs]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["K"] == 1  # the resolved config, printed before the problems
    assert "K (branches per group) must be >= 2, got 1" in captured.err
    assert "checkpoint path '/no/such/dir' does not exist" in captured.err  # every problem
    assert main(["--check", runs]) == 0  # the toy default would run
    assert json.loads(capsys.readouterr().out)["K"] == 8
    assert not (tmp_path / "runs").exists()


def test_bad_prompt_file(tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text('{"prompts": "a red circle moves left"}\n')
    assert main([f"data_path={tmp_path / 'prompts.jsonl'}"]) == 2
    assert '"prompts" must be a list of strings' in capsys.readouterr().err


def test_end_to_end(weights, tmp_path, capsys):
    args = tiny_args(
        weights, tmp_path, "run_name=r", "max_train_steps=2", "sample_interval_steps=2"
    )
    assert main(args) == 0
    run = tmp_path / "r"
    out = capsys.readouterr().out
    assert "held-out rewards" in out and "total" in out
    # the resolved config is saved and reloads to the same config
    saved = load_config(run / "config.yaml")
    assert saved == load_config(None, args) and yaml.safe_load((run / "config.yaml").read_text())
    records = _metrics(run)
    # two training steps of sync_every = 2 rollouts; metrics per rollout
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["train_step"] for r in records] == [0, 0, 1, 1]
    # old policy synced every 2 rollouts: rollouts 0 and 2 are first after a sync, ratio 1
    for r in records:
        assert r["sync/first_update_after_sync"] == (r["step"] in (0, 2))
        if r["step"] in (0, 2):
            assert r["sync/ratio_exactly_one"] is True and r["sync/max_abs_log_ratio"] == 0.0
    assert records[1]["sync/max_abs_log_ratio"] > 0  # the policy moved after step 0
    for key in ("reward_local/text_alignment/branches", "advantage/final", "grad_norm", "lr",
                "time/rollout", "time/replay_grad", "kv_bytes/window", "peak_memory_bytes",
                "policy/clip_fraction", "routing/plan"):  # fmt: skip
        assert key in records[0], key
    assert len(records[0]["reward_local/text_alignment/branches"]) == 3
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["heldout"]][-1] == "total" and summary["steps"] == 2
    for plot in ("reward_curve.png", "training_curves.png"):
        assert min(Image.open(run / plot).size) > 300, plot
    assert (run / "samples" / "step00002.mp4").stat().st_size > 0
    grid = Image.open(run / "samples" / "step00002_branches.png")
    assert grid.size[1] > 4 * 16 * 4  # G + 1 = 4 rows of 16-pixel frames at scale 4
    gif = Image.open(run / "samples" / "step00002.gif")
    assert gif.n_frames == 12
    # the exported adapter loads with peft and holds the trained weights
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from kvpo.toy.model import load_toy_model
    from kvpo.training.checkpoint import load_checkpoint

    base = load_toy_model(weights).wan.transformer
    peft_model = PeftModel.from_pretrained(base, str(run / "adapter"))
    loaded = get_peft_model_state_dict(peft_model)
    exported = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert set(loaded) == {k.removeprefix("base_model.model.") for k in exported} or set(
        loaded
    ) == set(exported)
    policy = load_checkpoint(run).policy
    b_name = next(k for k in policy if "lora_B" in k)
    assert policy[b_name].abs().sum() > 0  # training moved the adapter away from B = 0
    peft_name = next(k for k in loaded if k.endswith(b_name.replace(".default", "")))
    assert torch.equal(loaded[peft_name], policy[b_name])
