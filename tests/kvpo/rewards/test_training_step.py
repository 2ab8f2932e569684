"""One training step of the tiny toy trainer with each real scorer (tiny random weights), built by
``resolve_reward`` from a name, a path and options as a run builds it. The step's recorded global
reward of the anchor is checked against the scorer called here on each prompt segment of the
anchor's video (the global signal: one clip per segment, each with its own prompt, averaged)."""

import math

import pytest

from kvpo.rewards.registry import resolve_reward
from kvpo.training.distributed import DistInfo
from kvpo.training.trainer import build_learner
from tests.kvpo.rewards.layouts import write_hpsv3, write_videoreward
from tests.kvpo.trainer_fixtures import tiny_config, tiny_generator_dir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


@pytest.fixture(scope="module")
def videoreward(tmp_path_factory):
    return write_videoreward(tmp_path_factory.mktemp("videoalign"))


@pytest.fixture(scope="module")
def hpsv3(tmp_path_factory):
    return write_hpsv3(tmp_path_factory.mktemp("hpsv3"))


def run_one_step(weights, tmp_path, reward, component):
    weighted = f"reward_components=[{{name: {component}, weight: 1.0}}]"
    cfg = tiny_config(weights, tmp_path, "max_train_steps=1", weighted)
    learner = build_learner(cfg, DistInfo(), reward=reward)
    record = learner.train_step(1)
    assert math.isfinite(record["loss"])
    prompts = learner.prompts.train(1, 0)
    anchor = learner.last_videos[cfg.K : cfg.K + 1]
    segments = learner.video_layout.segments(len(prompts))
    expected = {name: 0.0 for name in reward.names}
    for (lo, hi), prompt in zip(segments, prompts):
        for name, value in reward(anchor[:, lo:hi], [prompt], {"segment_starts": [[0]]}).items():
            expected[name] += float(value) / len(segments)
    for name in reward.names:
        assert len(record[f"reward_local/{name}/branches"]) == cfg.K
        recorded = record[f"reward_global/{name}/anchor"]
        assert recorded == pytest.approx(expected[name], rel=1e-4, abs=1e-5)
    return record


@pytest.mark.parametrize("name", ["motion_smoothness", "dynamic_degree"])
def test_training_step_with_a_motion_reward(weights, tmp_path, raft_file, name):
    reward = resolve_reward(name, path=str(raft_file), num_flow_updates=1, batch_size=8)
    run_one_step(weights, tmp_path, reward, name)


@pytest.mark.parametrize("name", ["videoalign", "videoalign_mq"])
def test_training_step_with_videoalign(weights, tmp_path, videoreward, name):
    ckpt, base, _, _ = videoreward
    reward = resolve_reward(name, path=str(ckpt), base_model=str(base), batch_size=4)
    run_one_step(weights, tmp_path, reward, name)


def test_training_step_with_hpsv3(weights, tmp_path, hpsv3):
    folder, base, _, _ = hpsv3
    reward = resolve_reward("video_hpsv3", path=str(folder), base_model=str(base), batch_size=8)
    run_one_step(weights, tmp_path, reward, "video_hpsv3")
