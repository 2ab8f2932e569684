"""resolve_reward with scorer options: passed to the factory, None left out, an option the factory
does not take named in the error; the config keys they come from; the built-in names."""

from types import SimpleNamespace

import pytest

from kvpo.rewards.registry import available_rewards, resolve_reward, reward_options


class Options:
    """A factory taking two of the scorer options (importable as ``...test_registry:Options``)."""

    names = ("seen",)

    def __init__(self, path=None, batch_size=0):
        self.path, self.batch_size = path, batch_size

    def __call__(self, videos, prompts, metadata=None):
        raise NotImplementedError


def test_options_reach_the_factory_and_unknown_ones_are_named():
    spec = "tests.kvpo.rewards.test_registry:Options"
    built = resolve_reward(spec, path="/w", batch_size=3, offload=None)
    assert (built.path, built.batch_size) == ("/w", 3)
    assert resolve_reward(spec).path is None  # no options: the factory's defaults
    with pytest.raises(TypeError, match=r"does not take the option\(s\) \['offload'\]"):
        resolve_reward(spec, offload=True)
    with pytest.raises(TypeError, match=r"reward 'toy' does not take the option\(s\) \['path'\]"):
        resolve_reward("toy", path="/w")
    with pytest.raises(KeyError, match="no reward named 'nope'"):
        resolve_reward("nope", path="/w")


def test_config_keys_and_builtin_names():
    cfg = SimpleNamespace(reward_path="/ckpt", reward_base_model="", reward_batch_size=0,
                          reward_offload=True)  # fmt: skip
    assert reward_options(cfg) == {"path": "/ckpt", "offload": True}
    assert reward_options(SimpleNamespace()) == {}  # a config without the keys
    names = {"toy", "video_hpsv3", "videoalign", "videoalign_vq", "videoalign_mq",
             "videoalign_mq_rgb", "videoalign_ta", "motion_smoothness",
             "dynamic_degree"}  # fmt: skip
    assert names <= set(available_rewards())
