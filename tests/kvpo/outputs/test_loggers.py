"""metrics.jsonl, TensorBoard and W&B outputs of kvpo.outputs.loggers, written and read back."""

import json
import math
import sys

import pytest
import torch

from kvpo.outputs.loggers import MetricsLogger, flatten, read_metrics, scalars


def test_flatten_nested_dicts_and_tensors():
    record = {"loss": torch.tensor(0.5), "policy": {"ratio": torch.tensor([1.0, 2.0]), "n": 3}}
    assert flatten(record) == {"loss": 0.5, "policy/ratio": [1.0, 2.0], "policy/n": 3}


def test_jsonl_round_trip(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    first = {
        "loss": torch.tensor(0.25),
        "reward_local": {"a": {"branches": torch.tensor([0.5, 1.5])}},
    }
    logger.log(0, first)
    logger.log(1, {"skipped": "non-finite loss", "time": {"rollout": 1.5}})
    logger.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 2
    assert all(isinstance(r.pop("time"), float) for r in records)
    assert records[0] == {"step": 0, "loss": 0.25, "reward_local/a/branches": [0.5, 1.5]}
    assert records[1] == {"step": 1, "skipped": "non-finite loss", "time/rollout": 1.5}


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False, tensorboard=True, wandb=True)
    assert logger.log(3, {"x": 1.0})["x"] == 1.0
    logger.close()
    assert not (tmp_path / "run").exists()


def test_read_metrics_drops_a_cut_short_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    path.write_text('{"step": 0}\n\n{"step": 1}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2: not a JSON record"):
        read_metrics(path)


def test_scalars_are_finite_numbers_without_step():
    flat = {"step": 4, "a": 1, "b": 2.5, "c": float("nan"), "d": [1.0], "e": "x", "f": True}
    assert scalars(flat) == {"a": 1.0, "b": 2.5, "f": 1.0}


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(3):
        logger.log(step, {"loss": 1.0 / (step + 1), "list": [1.0, 2.0], "bad": math.inf})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "loss" in events.Tags()["scalars"] and "time" in events.Tags()["scalars"]
    assert not {"list", "bad", "step"} & set(events.Tags()["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])


@pytest.mark.parametrize(("flag", "package"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_package_names_what_to_install(tmp_path, monkeypatch, flag, package):
    monkeypatch.setitem(sys.modules, package, None)  # its import raises ImportError
    with pytest.raises(ImportError, match=f"pip install {package}"):
        MetricsLogger(tmp_path, **{flag: True})


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"lr": 0.000123, "K": 8}
    logger = MetricsLogger(tmp_path, wandb=True, wandb_project="kvpo-test", config=config)
    logger.log(0, {"loss": 0.75, "per_branch": [1.0, 2.0]})
    logger.log(1, {"loss": 0.4375})
    logger.close()
    wandb.teardown()  # finish() returns before wandb-core has written the run's file
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (data,) = runs[0].glob("run-*.wandb")  # W&B's protobuf record log of the run
    raw = data.read_bytes()
    for text in ("loss", "0.4375", "0.75", json.dumps(config["lr"])):
        assert text.encode() in raw, text
    assert b"per_branch" not in raw  # lists stay in metrics.jsonl
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
