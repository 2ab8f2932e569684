"""Steps with non-finite rewards are skipped (on every rank) and training continues; too many in a
row stop the run (``python -m kvpo.train`` on random tiny weights)."""

import json

import pytest

from kvpo.rewards.registry import register_reward
from kvpo.train import main
from tests.kvpo.trainer_fixtures import tiny_args, tiny_generator_dir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _FlakyReward:
    """The toy reward, NaN on the first ``bad_calls`` calls (or always)."""

    names = ("text_alignment", "motion_quality", "visual_quality")

    def __init__(self, bad_calls: int = 10**9):
        from kvpo.toy.rewards import ToyReward

        self.inner, self.left = ToyReward(), bad_calls

    def __call__(self, videos, prompts, metadata=None):
        out = self.inner(videos, prompts, metadata)
        if self.left > 0:
            self.left -= 1
            out = {k: v * float("nan") for k, v in out.items()}
        return out


register_reward("test_nan_first_step")(lambda: _FlakyReward(bad_calls=2))
register_reward("test_nan_always")(_FlakyReward)


def test_nan_step_is_skipped_and_training_continues(weights, tmp_path):
    args = tiny_args(weights, tmp_path, "run_name=n", "reward_model=test_nan_first_step",
                     "eval_before=false", "eval_after=false")  # fmt: skip
    assert main(args) == 0
    records = _metrics(tmp_path / "n")
    assert "non-finite reward" in records[0]["skipped"]
    assert "loss" in records[1] and "skipped" not in records[1]


def test_repeated_skips_stop_the_run(weights, tmp_path):
    args = tiny_args(weights, tmp_path, "run_name=s", "reward_model=test_nan_always",
                     "eval_before=false", "eval_after=false", "max_consecutive_skips=2",
                     "max_train_steps=5")  # fmt: skip
    with pytest.raises(RuntimeError, match="2 consecutive steps skipped"):
        main(args)
