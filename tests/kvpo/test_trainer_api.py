"""The trainer as a library: KVPOTrainer driven from Python, reward plug-ins, ppo_epochs, and the
held-out evaluation shared with ``kvpo evaluate`` (tiny random weights)."""

import json

import pytest
import torch

from kvpo import KVPOTrainer
from kvpo.method.policy import policy_loss
from kvpo.streaming import heldout_seed
from kvpo.training.distributed import DistInfo
from kvpo.training.phases import PhaseTimer
from kvpo.training.trainer import build_learner
from tests.kvpo.trainer_fixtures import tiny_args, tiny_config, tiny_generator_dir

BRIGHTNESS = ["reward_components=[{name: brightness, weight: 1.0}]"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def brightness(videos, prompts, metadata=None):
    """A reward written here: mean pixel value of each clip, [B] fp32."""
    return {"brightness": videos.float().mean(dim=(1, 2, 3, 4))}


class Brightness:
    """The same reward as an importable factory (``tests.kvpo.test_trainer_api:Brightness``)."""

    names = ("brightness",)

    def __call__(self, videos, prompts, metadata=None):
        return brightness(videos, prompts, metadata)


def test_tiny_run_from_python_with_a_reward_callable(weights, tmp_path):
    prompts = [["a red circle moves left", "a blue square moves up"]] * 3 + [
        ["a green triangle moves down", "a green triangle moves right"]
    ]
    cfg = tiny_config(weights, tmp_path, "run_name=py", "eval_prompts=1", *BRIGHTNESS)
    calls = []

    def reward(videos, prompts, metadata=None):
        calls.append((tuple(videos.shape), list(prompts)))
        return brightness(videos, prompts, metadata)

    trainer = KVPOTrainer(cfg, reward=reward, prompts=prompts, info=DistInfo())
    # the held-out video (the last sequence) and its expected score, written out here: one
    # clip per segment, the mean pixel of each, averaged
    held = trainer.learner.prompts.heldout(1)
    assert held == [prompts[3]]
    switch = trainer.learner.stream.layout.switches[0]
    video = trainer.learner.stream.videos(held, [heldout_seed(cfg.seed, 0, 0)])[0]
    expected = float((video[:switch].mean() + video[switch:].mean()) / 2)
    calls.clear()

    summary = trainer.train()
    assert summary["steps"] == 2
    assert [s["name"] for s in summary["heldout"]] == ["brightness", "total"]
    before = json.loads((tmp_path / "py" / "eval_before.json").read_text())
    assert before["brightness"] == pytest.approx([expected], rel=1e-6)
    # training drew from the first three sequences only (rollout rewards score G + 1 = 4 rows)
    train_prompts = {p for shape, ps in calls if shape[0] == 4 for p in ps}
    assert "a red circle moves left" in train_prompts
    assert not any("green" in p for p in train_prompts)


def test_reward_import_path(weights, tmp_path):
    cfg = tiny_config(
        weights, tmp_path, "reward_model=tests.kvpo.test_trainer_api:Brightness", *BRIGHTNESS
    )
    learner = build_learner(cfg, DistInfo())
    assert isinstance(learner.reward, Brightness)
    with pytest.raises(ValueError, match="cannot import 'Nope' from 'tests.kvpo.test_trainer_api'"):
        build_learner(
            tiny_config(weights, tmp_path, "reward_model=tests.kvpo.test_trainer_api:Nope"),
            DistInfo(),
        )


def test_ppo_epochs_equal_sequential_updates_on_one_rollout(weights, tmp_path):
    """ppo_epochs=2: two updates on the same rollout with the old / reference energies fixed
    equal two updates written out here (replay with grad, objective, backward, step)."""
    cfg = tiny_config(weights, tmp_path, "ppo_epochs=2", "ema_decay=0", "lr=1e-3")
    torch.manual_seed(5)
    auto = build_learner(cfg, DistInfo())
    record = auto.train_step(0)
    assert len(record["ppo/epoch_losses"]) == 2
    assert record["ppo/epoch_losses"][0] == record["loss"]

    torch.manual_seed(5)
    hand = build_learner(cfg, DistInfo())
    data = hand.collect(0, PhaseTimer())
    branches = list(range(cfg.K))
    losses = []
    for _ in range(2):
        hand.optimizer.zero_grad(set_to_none=True)
        energy = hand.energies(data.rollout, data.prompts, branches, "default")
        loss = policy_loss(
            energy, data.energy_old, data.energy_ref, data.advantages,
            beats_anchor=data.beats_anchor, config=cfg.policy_config(),
        ).loss  # fmt: skip
        loss.backward()
        hand.apply_update(PhaseTimer())
        losses.append(float(loss.detach()))
    hand.cache.free([data.rollout.snapshot])
    assert losses == pytest.approx(record["ppo/epoch_losses"], rel=1e-6)
    assert losses[0] != losses[1]  # the second epoch saw the updated policy
    for name, p in auto.named_params.items():
        torch.testing.assert_close(p, hand.named_params[name], rtol=0, atol=1e-7)
    # one rollout was counted (sync_every=2: no sync yet, so no scheduler step), two optimizer
    # updates were made
    assert auto.counters.since_sync == 1 and auto.counters.step == 0
    assert all(int(auto.optimizer.state[p]["step"]) == 2 for p in auto.params)


def test_heldout_evaluation_equals_kvpo_evaluate(weights, tmp_path, capsys):
    """The trainer's evaluation before training and ``kvpo evaluate`` give identical numbers
    for the same weights, prompts and seeds."""
    from kvpo.evaluate import main as evaluate_main

    trainer = KVPOTrainer(tiny_config(weights, tmp_path, "run_name=e"), info=DistInfo())
    scores = trainer.evaluate("before")
    out = tmp_path / "scores.json"
    args = [*tiny_args(weights, tmp_path), "--json", str(out), "--no-baselines"]
    assert evaluate_main(args) == 0
    assert json.loads(out.read_text())["model"] == scores
    assert "| model |" in capsys.readouterr().out


def test_kvpo_command_dispatches_and_translates_overrides(weights, tmp_path, capsys):
    from kvpo.cli import as_flags, main

    assert as_flags(["prompt=a red circle", "samples=4", "--seed", "3", "num_blocks=2"]) == [
        "--prompt", "a red circle", "--samples", "4", "--seed", "3", "--num-blocks", "2",
    ]  # fmt: skip
    assert main(["train", "--check", *tiny_args(weights, tmp_path), "K=5"]) == 0
    assert json.loads(capsys.readouterr().out)["K"] == 5
    assert main(["frobnicate"]) == 2
    assert "unknown job 'frobnicate'" in capsys.readouterr().err
    out = tmp_path / "s"
    assert main(["sample", f"out={out}", "samples=1", "num_blocks=3"]) == 0
    assert (out / "sample_0.gif").is_file()


def test_kvpo_evaluate_scores_a_trained_adapter_as_the_trainer_did(weights, tmp_path):
    """``kvpo evaluate lora_ckpt=<run>/adapter/...`` (the LoRA merged into the weights) gives the
    run's own evaluation after training (the LoRA applied unmerged) up to fp32 rounding."""
    from kvpo.evaluate import main as evaluate_main
    from kvpo.train import main as train_main

    args = tiny_args(weights, tmp_path, "run_name=a", "lr=3e-2", "eval_before=false")
    assert train_main(args) == 0
    after = json.loads((tmp_path / "a" / "eval_after.json").read_text())
    adapter = tmp_path / "a" / "adapter" / "adapter_model.safetensors"
    out = tmp_path / "adapter_scores.json"
    assert evaluate_main([*args, f"lora_ckpt={adapter}", "--json", str(out), "--no-baselines"]) == 0
    merged = json.loads(out.read_text())["model"]
    for name, values in after.items():
        assert merged[name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
    # the adapter moved the weights: without it the scores differ
    assert evaluate_main([*args, "--json", str(out), "--no-baselines"]) == 0
    assert json.loads(out.read_text())["model"] != after
