"""Held-out evaluation (``kvpo.training.heldout``): the pair order, the split over ranks (every
pair on exactly one rank), evaluation merged over simulated ranks against scores written out
here, and two real gloo processes against one."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kvpo.rewards.clips import GlobalReward, VideoLayout
from kvpo.streaming import heldout_seed
from kvpo.training import heldout
from kvpo.training.distributed import DistInfo
from kvpo.training.heldout import eval_pairs, evaluate, rank_pairs
from kvpo.video_model import wan_video_frame


def test_eval_pairs_prompt_major():
    assert eval_pairs(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert eval_pairs(3, 1) == [(0, 0), (1, 0), (2, 0)]
    assert eval_pairs(1, 2) == [(0, 0), (0, 1)]
    assert eval_pairs(0, 2) == [] and eval_pairs(2, 0) == []


SIX = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
FIVE = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]


@pytest.mark.parametrize(
    ("pairs", "world", "split"),
    [
        (SIX, 1, [SIX]),
        (SIX, 2, [[(0, 0), (0, 2), (1, 1)], [(0, 1), (1, 0), (1, 2)]]),
        (SIX, 3, [[(0, 0), (1, 0)], [(0, 1), (1, 1)], [(0, 2), (1, 2)]]),
        (FIVE, 1, [FIVE]),
        (FIVE, 2, [[(0, 0), (2, 0), (4, 0)], [(1, 0), (3, 0)]]),
        (FIVE, 3, [[(0, 0), (3, 0)], [(1, 0), (4, 0)], [(2, 0)]]),
        ([(0, 0), (0, 1)], 3, [[(0, 0)], [(0, 1)], []]),  # more ranks than pairs
    ],
)
def test_rank_pairs(pairs, world, split):
    assert [rank_pairs(pairs, r, world) for r in range(world)] == split
    # every pair on exactly one rank; counts differ by at most one
    flat = [p for part in split for p in part]
    assert sorted(flat) == sorted(pairs) and len(flat) == len(pairs)
    assert max(map(len, split)) - min(map(len, split)) <= 1


# ---------------------------------------------------------------- evaluate over simulated ranks
BASE_SEED = 7
PROMPTS = [["aa", "bbbb"], ["c", "dd"], ["eeeee", "ffff"]]
PAIR_OF_SEED = {heldout_seed(BASE_SEED, p, s): (p, s) for p in range(3) for s in range(2)}


class _Model:
    video_frame = staticmethod(wan_video_frame)


class _Stream:
    """6 latent frames with a switch at 3 -> 21 video frames, switch at video frame 9. Video of
    pair (p, s), frame t: every pixel 10 p + s + t / 100."""

    layout = VideoLayout(6, (3,))
    model = _Model()

    def __init__(self):
        self.calls = []

    def videos(self, seqs, seeds):
        pairs = [PAIR_OF_SEED[s] for s in seeds]
        assert [PROMPTS[p] for p, _ in pairs] == seqs
        self.calls.append(pairs)
        base = torch.tensor([10.0 * p + s for p, s in pairs])
        frames = base[:, None] + torch.arange(21.0)[None, :] / 100
        return frames[:, :, None, None, None].expand(-1, -1, 3, 2, 2)


def _reward(videos, prompts, metadata):
    return {"brightness": videos.mean(dim=(1, 2, 3, 4)), "chars": torch.tensor(
        [float(len(p)) for p in prompts])}  # fmt: skip


# clip_len 0: clips [0, 9) and [9, 21), mean t 4 and 14.5 -> + 0.0925; clip_len 4: windows
# [2, 6) and [13, 17) (centres 4 and 15), mean t 3.5 and 14.5 -> + 0.09. Characters per
# sequence: (2 + 4) / 2, (1 + 2) / 2, (5 + 4) / 2.
EXPECTED = {
    0: [0.0925, 1.0925, 10.0925, 11.0925, 20.0925, 21.0925],
    4: [0.09, 1.09, 10.09, 11.09, 20.09, 21.09],
}
CHARS = [3.0, 3.0, 1.5, 1.5, 4.5, 4.5]
PAIRS_OF_RANK = {
    1: [[(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]],
    2: [[(0, 0), (1, 0), (2, 0)], [(0, 1), (1, 1), (2, 1)]],
    3: [[(0, 0), (1, 1)], [(0, 1), (2, 0)], [(1, 0), (2, 1)]],
}


class _Gathered(Exception):
    pass


@pytest.mark.parametrize("clip_len", [0, 4])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluate_merged_over_ranks(monkeypatch, world, clip_len):
    """Each simulated rank generates and scores only its pairs; with the gather replaced by the
    list of every rank's part, every rank returns all pairs' scores in eval_pairs order."""
    parts, streams = {}, {}

    def capture(obj, info):
        parts[info.rank] = obj
        raise _Gathered

    def run(rank):
        streams[rank] = _Stream()
        return evaluate(
            streams[rank], _reward, PROMPTS, 2, base_seed=BASE_SEED,
            info=DistInfo(rank=rank, world_size=world), batch=2,
            global_reward=GlobalReward(clip_len=clip_len),
        )  # fmt: skip

    monkeypatch.setattr(heldout, "gather_objects", capture)
    for r in range(world):
        with pytest.raises(_Gathered):
            run(r)
    for r in range(world):
        mine = PAIRS_OF_RANK[world][r]
        assert list(parts[r]) == mine
        # batches of 2 videos, rank's pairs in order
        assert streams[r].calls == [mine[i : i + 2] for i in range(0, len(mine), 2)]
        for pair, values in parts[r].items():
            i = PAIRS_OF_RANK[1][0].index(pair)
            assert values == pytest.approx(
                {"brightness": EXPECTED[clip_len][i], "chars": CHARS[i]}, rel=1e-6
            )

    def gather(obj, info):
        assert obj == parts[info.rank]
        return [parts[r] for r in range(info.world_size)]

    monkeypatch.setattr(heldout, "gather_objects", gather)
    for r in range(world):
        scores = run(r)
        assert list(scores) == ["brightness", "chars"]
        assert scores["brightness"] == pytest.approx(EXPECTED[clip_len], rel=1e-6)
        assert scores["chars"] == CHARS


def test_evaluate_batch_size_does_not_change_scores():
    one = evaluate(_Stream(), _reward, PROMPTS, 2, base_seed=BASE_SEED, info=DistInfo(), batch=1)
    stream = _Stream()
    all_ = evaluate(stream, _reward, PROMPTS, 2, base_seed=BASE_SEED, info=DistInfo(), batch=16)
    assert len(stream.calls) == 1 and one == all_
    assert one["brightness"] == pytest.approx(EXPECTED[0], rel=1e-6)


# --------------------------------------------------------------------- two real gloo processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EVAL = ("eval_prompts=3", "eval_seeds=1")  # 3 pairs: 2 on rank 0, 1 on rank 1


def _eval_worker(rank: int, world: int, port: int, weights: str, out_dir: str) -> None:
    from kvpo.evaluate import model_scores
    from kvpo.training.distributed import init_distributed, shutdown
    from kvpo.video_model import load_video_model
    from tests.kvpo.trainer_fixtures import tiny_config

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    cfg = tiny_config(weights, out_dir, *EVAL)
    scores = model_scores(cfg, load_video_model(cfg, info.device), info)
    with open(os.path.join(out_dir, f"scores{rank}.json"), "w") as f:
        json.dump(scores, f)
    shutdown(info)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    from kvpo.evaluate import model_scores
    from kvpo.video_model import load_video_model
    from tests.kvpo.trainer_fixtures import tiny_config, tiny_generator_dir

    weights = tiny_generator_dir(tmp_path / "weights")
    mp.spawn(_eval_worker, args=(2, _free_port(), str(weights), str(tmp_path)), nprocs=2, join=True)
    cfg = tiny_config(weights, tmp_path, *EVAL)
    single = model_scores(cfg, load_video_model(cfg, torch.device("cpu")), DistInfo())
    assert set(single) >= {"text_alignment", "motion_quality", "visual_quality"}
    assert all(len(v) == 3 for v in single.values())
    assert len(set(single["text_alignment"])) == 3  # three different videos
    for r in range(2):
        ranked = json.loads((tmp_path / f"scores{r}.json").read_text())
        assert list(ranked) == list(single)
        for name, values in single.items():
            assert ranked[name] == pytest.approx(values, rel=1e-5, abs=1e-7), name
