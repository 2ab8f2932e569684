"""Checkpoints: exact round trips, atomic writes, a resumed run equal to an uninterrupted one (also
from inside a sync period)."""

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from kvpo.training import checkpoint as ckpt
from kvpo.training.checkpoint import (
    TrainingState,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def _trained_linear(steps: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    x = torch.randn(16, 4)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched, x


def _state(step, model, opt, sched):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return TrainingState(
        step=step,
        policy=weights,
        old_policy={k: v * 2 for k, v in weights.items()},
        ema={k: v + 1 for k, v in weights.items()},
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        rng=capture_rng(),
        extra={"skips": 1, "history": [[1, 0.5]]},
    )


def test_round_trip_continues_bit_exactly(tmp_path):
    model, opt, sched, x = _trained_linear(3)
    path = save_checkpoint(tmp_path, _state(3, model, opt, sched))
    assert path.name == "step-000003"
    loaded = load_checkpoint(tmp_path)  # the run directory resolves through checkpoints/latest
    assert loaded.step == 3 and loaded.extra == {"skips": 1, "history": [[1, 0.5]]}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.policy[k], v)
        assert torch.equal(loaded.old_policy[k], v * 2) and torch.equal(loaded.ema[k], v + 1)

    # a fresh model + optimizer restored from the checkpoint takes the same next step
    fresh, opt2, sched2, _ = _trained_linear(0)
    fresh.load_state_dict(loaded.policy)
    opt2.load_state_dict(loaded.optimizer)
    sched2.load_state_dict(loaded.scheduler)
    for m, o, s in ((model, opt, sched), (fresh, opt2, sched2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_rng_states_restore():
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_write_is_atomic(tmp_path, monkeypatch):
    model, opt, sched, _ = _trained_linear(1)
    save_checkpoint(tmp_path, _state(1, model, opt, sched))
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("step-000002"):
            raise OSError("disk pulled out")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        save_checkpoint(tmp_path, _state(2, model, opt, sched))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert load_checkpoint(tmp_path).step == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]


def test_keep_last_and_errors(tmp_path):
    model, opt, sched, _ = _trained_linear(1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _state(step, model, opt, sched), keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-000002", "step-000003"]
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


def test_interrupted_run_resumes_bit_exactly(tmp_path):
    """2 training steps in one go == 1 step, stop, ``--resume`` for the second (sync_every = 2:
    a step is 2 rollouts, and the resumed step starts right after an old-policy sync)."""
    from kvpo.train import main
    from tests.kvpo.trainer_fixtures import tiny_args, tiny_generator_dir

    weights = tiny_generator_dir(tmp_path / "weights")
    quiet = ("eval_before=false", "eval_after=false")
    assert main(tiny_args(weights, tmp_path, "run_name=full", "max_train_steps=2", *quiet)) == 0
    assert main(tiny_args(weights, tmp_path, "run_name=part", "max_train_steps=1", *quiet)) == 0
    assert load_checkpoint(tmp_path / "part").extra["counters"]["rollouts"] == 2
    assert main(["--resume", str(tmp_path / "part"), "max_train_steps=2"]) == 0
    full, part = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert full.step == part.step == 2
    for a, b in (
        (full.policy, part.policy),
        (full.old_policy, part.old_policy),
        (full.ema, part.ema),
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for pid, entries in full.optimizer["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, part.optimizer["state"][pid][name])
    assert full.scheduler == part.scheduler
    counters = {"step": 2, "rollouts": 4, "since_sync": 0, "consecutive_skips": 0, "skipped": 0}
    assert full.extra["counters"] == part.extra["counters"] == counters
    lines = [
        [line for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("full", "part")
    ]
    import json

    last = [json.loads(x[-1]) for x in lines]
    assert last[0]["step"] == last[1]["step"] == 3  # the fourth rollout
    assert last[0]["train_step"] == last[1]["train_step"] == 1
    for key in ("loss", "energy/current", "advantage/final", "grad_norm", "routing/plan", "lr"):
        assert last[0][key] == last[1][key], key


def test_resume_inside_a_sync_period_continues_bit_exactly(tmp_path):
    """sync_every = 3: a checkpoint after the first rollout of a training step (old policy not
    yet re-synced, the LR schedule not yet advanced), loaded into a fresh learner, continues
    exactly as the learner that wrote it through the step's end (sync, schedule step) and into
    the next step."""
    from kvpo.models.lora import lora_parameters
    from kvpo.training.distributed import DistInfo
    from kvpo.training.learner import Counters
    from kvpo.training.state import load_state, save_state
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config, tiny_generator_dir

    weights = tiny_generator_dir(tmp_path / "weights")
    cfg = tiny_config(weights, tmp_path, "sync_every=3", "lr_warmup_steps=2", "lr=1e-3")
    torch.manual_seed(0)
    first = build_learner(cfg, DistInfo())
    first.train_step(0)
    first.end_rollout()  # a skipped rollout counts too: its index 1 is spent
    save_state(first, tmp_path / "run", capture_rng())
    assert first.counters == Counters(step=0, rollouts=2, since_sync=2)

    torch.manual_seed(1)  # another LoRA initialisation: the checkpoint must overwrite it
    second = build_learner(cfg, DistInfo())
    load_state(second, tmp_path / "run")
    rng = capture_rng()

    def named(learner, adapter):
        return lora_parameters(learner.model, adapter)

    def snapshot(learner):
        return {
            "default": {k: v.detach().clone() for k, v in named(learner, "default").items()},
            "old": {k: v.detach().clone() for k, v in named(learner, "old").items()},
            "ema": {k: v.clone() for k, v in learner.ema.shadow.items()},
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": learner.scheduler.state_dict(),
            "counters": dataclasses.replace(learner.counters),
            "lr": learner.optimizer.param_groups[0]["lr"],
        }

    old = named(first, "old")
    assert any(not torch.equal(old[k.replace(".default.", ".old.")], v)
               for k, v in named(first, "default").items())  # fmt: skip
    # the warmup's first factor until the step ends: lr * 1 / 2
    assert first.optimizer.param_groups[0]["lr"] == second.optimizer.param_groups[0]["lr"] == 5e-4
    runs = []
    for learner in (first, second):
        restore_rng(rng)
        records = [learner.train_step(rollout) for rollout in (2, 3)]
        runs.append((records, snapshot(learner)))
    (rec_a, a), (rec_b, b) = runs
    assert a["counters"] == b["counters"] == Counters(step=1, rollouts=4, since_sync=1)
    assert a["lr"] == b["lr"] == 1e-3 and [r["lr"] for r in rec_a] == [5e-4, 1e-3]
    assert [r["loss"] for r in rec_a] == [r["loss"] for r in rec_b]
    assert a["scheduler"] == b["scheduler"]
    for key in ("default", "old", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for pid, entries in a["optimizer"]["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name])


def test_checkpoint_that_counts_rollouts_as_steps_is_refused(tmp_path):
    """A checkpoint written before a training step was sync_every rollouts (no ``rollouts``
    counter) cannot resume exactly and says so."""
    from kvpo.training.state import load_state

    model, opt, sched, _ = _trained_linear(2)
    state = _state(2, model, opt, sched)
    state.extra = {"counters": {"step": 2, "since_sync": 0, "consecutive_skips": 0, "skipped": 0}}
    save_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match="predates training steps of sync_every rollouts"):
        load_state(None, tmp_path)


def test_exported_adapter_starts_a_new_run_as_its_base(tmp_path):
    """``lora_ckpt=<run>/adapter/...`` with ``lora_init=merge``: the LoRA is merged into the base
    weights, so the new run's reference policy (adapters disabled) is the trained model."""
    from kvpo.models.lora import adapters, adapters_disabled, import_lora
    from kvpo.toy.model import load_toy_model
    from kvpo.train import main
    from kvpo.training.distributed import DistInfo
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_args, tiny_config, tiny_generator_dir

    weights = tiny_generator_dir(tmp_path / "weights")
    quiet = ("eval_before=false", "eval_after=false")
    assert main(tiny_args(weights, tmp_path, "run_name=a", *quiet)) == 0
    lora = tmp_path / "a" / "adapter" / "adapter_model.safetensors"
    cfg = tiny_config(weights, tmp_path, f"lora_ckpt={lora}", "lora_init=merge")
    trainer = build_learner(cfg, DistInfo())
    assert adapters(trainer.model) == ["default", "old"]
    reference = load_toy_model(weights)  # base + the trained LoRA as an adapter
    import_lora(reference.wan, lora)
    x = torch.randn(1, 3, 3, 16, 16)
    expected = reference.wan(x, 500.0, reference.encode(["a red circle moves left"]), 0)
    with torch.no_grad(), adapters_disabled(trainer.model):
        got = trainer.model(x, 500.0, trainer.video_model.encode(["a red circle moves left"]), 0)
    reference.wan.transformer.disable_adapters()
    base = reference.wan(x, 500.0, reference.encode(["a red circle moves left"]), 0)
    assert (expected - base).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
