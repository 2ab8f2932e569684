"""The reward server as a real process on 127.0.0.1: scores through it equal the in-process
scorer's bit for bit, malformed requests get clear 4xx answers while it keeps serving, and a
training run survives it being killed and restarted (or stops when it stays down)."""

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvpo import KVPOTrainer
from kvpo.rewards.client import RemoteReward
from kvpo.rewards.motion import MotionSmoothnessReward
from kvpo.rewards.registry import resolve_reward, score
from kvpo.rewards.wire import decode_scores, encode_request
from kvpo.training.distributed import DistInfo
from tests.kvpo.trainer_fixtures import tiny_config, tiny_generator_dir

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ["a red circle moves left", "a blue square moves up", "a green triangle moves down"]


class ServerProcess:
    """``python -m kvpo.rewards.server`` in a child process (one intra-op thread, as the tests)."""

    def __init__(self, args: list[str], logs: Path):
        self.args, self.logs, self.port, self.proc = args, logs, 0, None

    def start(self, timeout: float = 120.0) -> str:
        out = self.logs / f"out-{time.monotonic_ns()}.txt"
        with open(out, "w") as stdout, open(self.logs / "err.txt", "a") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvpo.rewards.server", *self.args, "--threads", "1",
                 "--device", "cpu", "--port", str(self.port)],
                stdout=stdout, stderr=stderr, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"at (http://127\.0\.0\.1:(\d+)/\S+)", out.read_text())
            if found:
                self.port = int(found.group(2))
                return found.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.logs / 'err.txt').read_text()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"server not up after {timeout} s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(raft_file, tmp_path_factory):
    args = ["--scorer", "motion_smoothness", "--path", str(raft_file), "--option",
            "num_flow_updates=1"]  # fmt: skip
    proc = ServerProcess(args, tmp_path_factory.mktemp("server_logs"))
    url = proc.start()
    yield proc, url
    proc.kill()


def quantised(videos):
    return (videos * 255).round() / 255


def test_scores_through_the_server_equal_in_process_bit_for_bit(server, raft_file):
    _, url = server
    torch.manual_seed(3)
    videos = torch.rand(3, 3, 3, 16, 16)
    local = MotionSmoothnessReward(raft_file, num_flow_updates=1)
    remote = resolve_reward(url)
    assert isinstance(remote, RemoteReward) and remote.names == local.names
    meta = {"segment_starts": [[0], [0], [0]]}
    out = score(remote, videos, PROMPTS, meta)
    want = local(quantised(videos), PROMPTS, meta)
    for name in local.names:
        assert torch.equal(out[name], want[name]), name
    one_by_one = resolve_reward(url, batch_size=1)(videos, PROMPTS, meta)  # three requests
    for name in local.names:
        single = torch.cat([local(quantised(videos[b : b + 1]), PROMPTS[b : b + 1])[name]
                            for b in range(3)])  # fmt: skip
        assert torch.equal(one_by_one[name], single), name
    with pytest.raises(TypeError, match=r"is served: set \['path'\] on the server"):
        resolve_reward(url, path="/elsewhere")


def raw(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_malformed_requests_get_clear_4xx_answers(server):
    proc, url = server
    port, path = proc.port, "/motion_smoothness"
    good = encode_request(torch.rand(2, 2, 3, 8, 8), PROMPTS[:2], None)
    from safetensors.torch import save

    cases = [
        ("POST", path, b"not a tensor file", 400, "body is not a safetensors file"),
        ("POST", path, b"short", 400, "body of 5 bytes is not a safetensors file"),
        ("POST", path, save({"videos": torch.rand(1, 2, 3, 8, 8)}, {"prompts": '["a"]'}), 400,
         "'videos' must be uint8 [B, T, 3, H, W], got torch.float32"),
        ("POST", path, save({"videos": torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)},
                            {"prompts": '["a", "b"]'}), 400, "expected 1 prompts (one per video)"),
        ("POST", path, save({"videos": torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8)}), 400,
         "metadata 'prompts' (a JSON list of strings) is missing"),
        ("POST", path, good[:40], 400, "header"),
        ("POST", "/video_hpsv3", good, 404, "this server serves /motion_smoothness"),
        ("PUT", path, good, 405, "PUT is not supported"),
        ("POST", path, b"", 413, "the limit is", {"Content-Length": str(1 << 40)}),
    ]  # fmt: skip
    for method, where, body, status, message, *headers in cases:
        got, data = raw(port, method, where, body, *headers)
        assert got == status and message in json.loads(data)["error"], (got, data)
        health, info = raw(port, "GET", "/health")  # still serving
        assert health == 200 and json.loads(info)["name"] == "motion_smoothness"
    status, data = raw(port, "POST", path, good)
    assert status == 200 and set(decode_scores(data)) == {"motion_smoothness",
        "motion_spatial_jitter", "motion_temporal_jitter", "motion_ratio"}  # fmt: skip


def run(weights, tmp_path, reward, *extra):
    cfg = tiny_config(
        weights, tmp_path, "reward_components=[{name: motion_smoothness, weight: 1.0}]",
        "eval_before=false", "eval_after=false", "run_name=remote", *extra,
    )  # fmt: skip
    trainer = KVPOTrainer(cfg, reward=reward, info=DistInfo())
    return trainer, trainer.train


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def test_the_run_continues_after_a_server_restart(server, weights, tmp_path):
    """Killed before step 1 (its three reward calls fail: NaN, the step is skipped, the adapter
    unchanged) and restarted in the background at step 2, whose first call retries with backoff
    until the new process answers: the run trains steps 0 and 2."""
    proc, url = server
    remote = RemoteReward(url, retries=1, backoff=0.05)
    calls, snapshots = [], {}

    def reward(videos, prompts, metadata=None):
        step = len(calls) // 3  # local clip + one clip per prompt segment (2)
        if len(calls) % 3 == 0:
            snapshots[step] = {
                k: p.detach().clone() for k, p in trainer.learner.named_params.items()
            }
            if step == 1:
                proc.kill()
            if step == 2:
                remote.retries, remote.backoff = 12, 0.5
                threading.Thread(target=proc.start, daemon=True).start()
        calls.append(step)
        return remote(videos, prompts, metadata)

    reward.names = remote.names
    trainer, train = run(weights, tmp_path, reward, "max_train_steps=3", "sync_every=1")
    summary = train()
    assert summary["steps"] == 3 and len(calls) == 9
    lines = [
        json.loads(x) for x in (tmp_path / "remote" / "metrics.jsonl").read_text().split("\n") if x
    ]
    records = {r["step"]: r for r in lines if "step" in r}
    # the learner's reason ("non-finite reward", or the client's failure when it reports it)
    assert records[1].get("skipped", "").startswith(("non-finite reward", "reward server"))
    assert "skipped" not in records[0] and "skipped" not in records[2]
    for name, value in snapshots[1].items():  # the skipped step left the adapter as it was
        assert torch.equal(snapshots[2][name], value), name
    assert any(not torch.equal(snapshots[1][n], v) for n, v in snapshots[0].items())
    assert remote.failure is None  # the last call went through
    assert raw(proc.port, "GET", "/health")[0] == 200


def test_a_server_that_stays_down_stops_the_run(weights, tmp_path, raft_file, tmp_path_factory):
    proc = ServerProcess(["--scorer", "motion_smoothness", "--path", str(raft_file)],
                         tmp_path_factory.mktemp("down_logs"))  # fmt: skip
    remote = RemoteReward(proc.start(), retries=1, backoff=0.05)
    proc.kill()
    trainer, train = run(weights, tmp_path, remote, "max_train_steps=4", "max_consecutive_skips=2")
    with pytest.raises(RuntimeError, match="2 consecutive steps skipped"):
        train()
    assert remote.failure.startswith(f"reward server http://127.0.0.1:{proc.port}")
    assert "2 tries failed" in remote.failure
    with pytest.raises(ConnectionError, match="start one with: kvpo reward-server"):
        RemoteReward(f"http://127.0.0.1:{proc.port}/motion_smoothness", retries=0)
