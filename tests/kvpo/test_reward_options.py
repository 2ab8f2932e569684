"""``reward_videos_per_call`` (the KVPO authors' ``reward_batch_size``: videos per scorer call,
0 = all) and ``eval_reward_components`` (the components and weights of the held-out evaluation,
default the training ones), as their trainer (``models/longlive/trainer/kvpo.py``:
``_compute_rewards_short`` / ``_compute_rewards_long`` and ``_get_eval_reward_setup``) does.

The rewards are written here: per clip, the mean pixel (``brightness``) plus a term of the
prompt's length (so a prompt paired with the wrong video shows), and the pixel standard
deviation (``contrast``); the expected values are computed plainly from the videos."""

import json

import pytest
import torch

from kvpo import KVPOTrainer
from kvpo.rewards.clips import Clip, score_clips
from kvpo.streaming import heldout_seed
from kvpo.training.distributed import DistInfo
from kvpo.training.trainer import build_learner
from tests.kvpo.trainer_fixtures import tiny_config, tiny_generator_dir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def brightness(video: torch.Tensor, prompt: str) -> float:
    """One clip ``[T, 3, H, W]``, in float64."""
    return float(video.double().mean()) + 0.01 * len(prompt)


def contrast(video: torch.Tensor) -> float:
    return float(video.double().std())


class Recorded:
    """The reward: ``{brightness, contrast}`` of each clip; remembers each call's batch size."""

    names = ("brightness", "contrast")

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, videos, prompts, metadata=None):
        self.sizes.append(len(videos))
        flat = videos.float().flatten(1)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.float32)
        return {"brightness": flat.mean(1) + 0.01 * lengths, "contrast": flat.std(1)}


def test_score_clips_in_calls_of_n_videos_equals_one_call():
    torch.manual_seed(0)
    videos = torch.rand(5, 8, 3, 4, 4)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    clips = [[Clip(0, 3, p), Clip(3, 8, p + "!")] for p in prompts]
    reward = Recorded()
    whole = score_clips(reward, videos, clips, 0)
    assert reward.sizes == [5, 5]  # one call per clip
    reward.sizes.clear()
    batched = score_clips(reward, videos, clips, 2)
    assert reward.sizes == [2, 2, 1, 2, 2, 1]  # per clip: videos 0-1, 2-3, 4
    for name in Recorded.names:
        torch.testing.assert_close(batched[name], whole[name], rtol=0, atol=0)
    for b, p in enumerate(prompts):
        expected = (brightness(videos[b, :3], p) + brightness(videos[b, 3:], p + "!")) / 2
        assert float(batched["brightness"][b]) == pytest.approx(expected, abs=1e-6)
        expected = (contrast(videos[b, :3]) + contrast(videos[b, 3:])) / 2
        assert float(batched["contrast"][b]) == pytest.approx(expected, abs=1e-6)


def test_training_step_rewards_do_not_depend_on_videos_per_call(weights, tmp_path):
    """K = 3: the 4 videos of a group scored in calls of 2 (their reward_batch_size) give the
    rewards of one call, and the anchor's global reward is the plain mean over its segments."""
    records, sizes = {}, {}
    components = "reward_components=[{name: brightness, weight: 1}, {name: contrast, weight: 0.5}]"
    for n in (0, 2):
        reward = Recorded()
        cfg = tiny_config(weights, tmp_path, components, f"reward_videos_per_call={n}")
        learner = build_learner(cfg, DistInfo(), reward=reward)
        records[n] = learner.train_step(0)
        sizes[n] = reward.sizes
    assert set(sizes[0]) == {cfg.K + 1} and set(sizes[2]) == {2}
    assert len(sizes[2]) == 2 * len(sizes[0])
    keys = [k for k in records[0] if k.startswith(("reward_local/", "reward_global/"))]
    assert len(keys) == 2 * 2 * 3  # local / global x branches / anchor x 2 components + total
    for key in keys:
        torch.testing.assert_close(
            torch.as_tensor(records[2][key]), torch.as_tensor(records[0][key]), rtol=0, atol=0
        )
    prompts = learner.prompts.train(0, 0)
    anchor = learner.last_videos[cfg.K]
    segments = learner.video_layout.segments(len(prompts))
    expected = sum(brightness(anchor[lo:hi], p) for (lo, hi), p in zip(segments, prompts))
    assert records[2]["reward_global/brightness/anchor"] == pytest.approx(
        expected / len(segments), abs=1e-6
    )


def test_evaluation_reports_the_eval_components_with_their_weights(weights, tmp_path):
    """Training on brightness, evaluating on contrast x 2: the held-out files, the summary and
    the logged means name contrast only, and their totals weigh it by 2."""
    prompts = [["a red circle moves left", "a blue square moves up"]] * 3 + [
        ["a green triangle moves down", "a green triangle moves right"]
    ]
    cfg = tiny_config(
        weights, tmp_path, "run_name=ev", "eval_prompts=1", "max_train_steps=1",
        "eval_interval_steps=1", "reward_components=[{name: brightness, weight: 1.0}]",
        "eval_reward_components=[{name: contrast, weight: 2.0}]", "reward_videos_per_call=1",
    )  # fmt: skip
    trainer = KVPOTrainer(cfg, reward=Recorded(), prompts=prompts, info=DistInfo())
    held = trainer.learner.prompts.heldout(1)
    switch = trainer.learner.stream.layout.switches[0]
    video = trainer.learner.stream.videos(held, [heldout_seed(cfg.seed, 0, 0)])[0]
    expected = (contrast(video[:switch]) + contrast(video[switch:])) / 2

    summary = trainer.train()
    run = trainer.run_dir
    before = json.loads((run / "eval_before.json").read_text())
    assert list(before) == ["contrast"]
    assert before["contrast"] == [pytest.approx(expected, abs=1e-6)]
    rows = {row["name"]: row for row in summary["heldout"]}
    assert list(rows) == ["contrast", "total"]
    for side in ("before", "after"):
        assert rows["total"][side] == pytest.approx(2.0 * rows["contrast"][side], rel=1e-12)
    assert rows["contrast"]["before"] == pytest.approx(expected, abs=1e-6)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in logged]
    evals = [e for e in evals if e]
    assert len(evals) == 1 and set(evals[0]) == {"eval/contrast", "eval/total"}
    assert evals[0]["eval/total"] == pytest.approx(2.0 * evals[0]["eval/contrast"], rel=1e-12)
    step = json.loads((run / "eval_step00001.json").read_text())
    assert list(step) == ["contrast"] and evals[0]["eval/contrast"] == step["contrast"][0]


def test_an_eval_component_the_reward_does_not_return_is_named(weights, tmp_path):
    cfg = tiny_config(
        weights, tmp_path, "run_name=bad", "eval_prompts=1",
        "reward_components=[{name: brightness, weight: 1.0}]",
        "eval_reward_components=[{name: sharpness, weight: 1.0}]",
    )  # fmt: skip
    trainer = KVPOTrainer(cfg, reward=Recorded(), info=DistInfo())
    with pytest.raises(ValueError, match=r"eval_reward_components name \['sharpness'\].*"
                       r"returns \['brightness', 'contrast'\]"):  # fmt: skip
        trainer.evaluate("before")
