"""Reward throughput: the real scorers batched versus one item per forward, on tiny random
models (no weights are downloaded).

Models: the tests' tiny Qwen2-VL (hidden 32, 2 layers, a 1-block vision tower) saved in the
released HPSv3 and VideoReward layouts and loaded by path as a run loads them; a random
``raft_small``. Inputs: 64 x 64 decoded frames in [0, 1] (HPSv3 resizes each to 448 x 448,
VideoAlign to 336 x 336, RAFT pads to 128 x 128). Providers: ``one at a time`` (the baseline:
``batch_size=1``: one frame for HPSv3, one video for VideoAlign, one frame pair for RAFT) and
``batched`` (the whole call in one forward). Notes: ``frames/s`` = input frames scored per
second. With tiny models the numbers measure the per-forward overhead the batching removes, not
the cost of the 2B / 7B models. On CPU the suite runs on one intra-op thread (the development
machine's 2 cores are shared); on a GPU the scorers run in bf16.
"""

from __future__ import annotations

import pytest
import torch

from kvpo.rewards.hpsv3 import HPSv3Reward
from kvpo.rewards.motion import MotionSmoothnessReward
from kvpo.rewards.raft import RAFT
from kvpo.rewards.videoalign import VideoAlignReward
from tests.kvpo.rewards.layouts import write_hpsv3, write_videoreward

SUITE = "reward_throughput"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_checkpoints")
    torch.manual_seed(0)
    raft = root / "raft_small.pth"
    torch.save(RAFT("small").state_dict(), raft)
    hpsv3 = write_hpsv3(root / "hpsv3")
    videoalign = write_videoreward(root / "videoalign")
    return {"raft": raft, "hpsv3": hpsv3[:2], "videoalign": videoalign[:2]}


def scorers(name, paths, batch):
    """``(scorer, items per call)`` for ``batch`` items per forward."""
    if name == "video_hpsv3":
        folder, base = paths["hpsv3"]
        return HPSv3Reward(str(folder), base_model=str(base), batch_size=batch)
    if name == "videoalign":
        folder, base = paths["videoalign"]
        return VideoAlignReward(str(folder), base_model=str(base), batch_size=batch)
    return MotionSmoothnessReward(paths["raft"], num_flow_updates=4, batch_size=batch)


CASES = [  # (scorer, videos, frames per video, what one item is)
    ("video_hpsv3", 2, 4, "frame"),
    ("videoalign", 4, 8, "video"),
    ("motion_smoothness", 2, 5, "frame pair"),
]


@pytest.mark.parametrize("name,videos,frames,item", CASES)
def test_reward_throughput(recorder, device, one_cpu_thread, checkpoints, name, videos, frames,
                           item):  # fmt: skip
    torch.manual_seed(1)
    clips = torch.rand(videos, frames, 3, 64, 64, device=device)
    prompts = ["a red circle moves left, then it turns blue"] * videos
    items = {"frame": videos * frames, "video": videos, "frame pair": videos * (frames - 1)}[item]
    case = f"{name} tiny, {videos} x {frames} frames 64x64 ({items} {item}s per call)"
    results = {}
    for provider, batch, baseline in (("one at a time", 1, True), ("batched", items, False)):
        scorer = scorers(name, checkpoints, batch)

        def call(scorer=scorer):
            with torch.no_grad():
                return scorer(clips, prompts)

        results[provider] = call()
        row = recorder.measure(SUITE, case, provider, call, device, baseline=baseline)
        row.extra["frames/s"] = round(videos * frames / (row.median_ms / 1e3), 1)
        row.extra["batch"] = f"{batch} {item}{'s' if batch > 1 else ''}"
    for key, value in results["batched"].items():  # the same scores either way
        torch.testing.assert_close(value, results["one at a time"][key], rtol=1e-3, atol=1e-3)
