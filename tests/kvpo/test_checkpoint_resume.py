"""Checkpoints: exact round trips, atomic writes, a resumed run equal to an uninterrupted one."""

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
    """3 steps in one go == 2 steps, stop, ``--resume`` for the third (sync_every = 2, so the
    resumed step starts right after an old-policy sync)."""
    from kvpo.train import main
    from tests.kvpo.trainer_fixtures import tiny_args, tiny_generator_dir

    weights = tiny_generator_dir(tmp_path / "weights")
    quiet = ("eval_before=false", "eval_after=false")
    assert main(tiny_args(weights, tmp_path, "run_name=full", "max_train_steps=3", *quiet)) == 0
    assert main(tiny_args(weights, tmp_path, "run_name=part", "max_train_steps=2", *quiet)) == 0
    assert main(["--resume", str(tmp_path / "part"), "max_train_steps=3"]) == 0
    full, part = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert full.step == part.step == 3
    for a, b in (
        (full.policy, part.policy),
        (full.old_policy, part.old_policy),
        (full.ema, part.ema),
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for pid, entries in full.optimizer["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, part.optimizer["state"][pid][name])
    assert full.extra["counters"] == part.extra["counters"]
    lines = [
        [line for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("full", "part")
    ]
    import json

    last = [json.loads(x[-1]) for x in lines]
    assert last[0]["step"] == last[1]["step"] == 2
    for key in ("loss", "energy/current", "advantage/final", "grad_norm", "routing/plan"):
        assert last[0][key] == last[1][key], key


def test_exported_adapter_starts_a_new_run_as_its_base(tmp_path):
    """``lora_ckpt=<run>/adapter/...``: the LoRA is merged into the base weights, so the new
    run's reference policy (adapters disabled) is the trained model."""
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
    cfg = tiny_config(weights, tmp_path, f"lora_ckpt={lora}")
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
