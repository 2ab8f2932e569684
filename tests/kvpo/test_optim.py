"""Optimiser schedules, the LR AdamW actually steps with (diffusers' schedule counted in training
steps of ``sync_every`` rollouts, as the KVPO authors' loop steps it, without their LR-0 first
step), the EMA and the gradient norm (``kvpo.training.optim``), against numbers written out here
and against ``diffusers.optimization.get_scheduler`` stepped here."""

import dataclasses
import math

import pytest
import torch
from diffusers.optimization import SchedulerType, get_scheduler

from kvpo.training.config import TrainConfig
from kvpo.training.distributed import DistInfo
from kvpo.training.optim import EMA, SCHEDULES, build_optimizer, grad_norm
from kvpo.training.phases import PhaseTimer


def _lrs(kind, warmup, total, updates, base=0.1):
    """The LR of each of ``updates`` updates, the scheduler stepped after each."""
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = build_optimizer([p], base, (0.8, 0.9), 0.0, kind, warmup, total)
    lrs = []
    for _ in range(updates):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer


@pytest.mark.parametrize(
    ("kind", "warmup", "total", "expected"),
    [
        ("constant", 4, 10, [1.0] * 12),
        # warmup: (s + 1) / 4 over steps 0..3 (never 0), then 1
        ("constant_with_warmup", 4, 10, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("constant_with_warmup", 0, 10, [1.0, 1.0, 1.0]),
        # diffusers' linear over total + 1 = 7 steps, warmup 2, from its step 1: k / 2 for
        # k = s + 1 < 2, then (7 - k) / 5; the last step (s = 5) at 0.2, past the end 0
        ("linear", 2, 6, [0.5, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0]),
        ("linear", 0, 4, [0.8, 0.6, 0.4, 0.2, 0.0]),  # (5 - k) / 5
        # cosine: (1 + cos(pi * (k - 2) / 5)) / 2 after the warmup, 0 at k = 7 (diffusers' cosine
        # rises again past its end: never reached in a run)
        ("cosine", 2, 6,
         [0.5, 1.0, *((1 + math.cos(math.pi * j / 5)) / 2 for j in (1, 2, 3, 4)), 0.0]),
    ],
)  # fmt: skip
def test_lr_of_each_training_step(kind, warmup, total, expected):
    lrs, optimizer = _lrs(kind, warmup, total, len(expected), base=1.0)
    assert lrs == pytest.approx(expected, abs=1e-12)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.0
    assert isinstance(optimizer, torch.optim.AdamW)


def test_lr_values_written_out():
    # cos(pi / 5) = (1 + sqrt(5)) / 4: the cosine step after warmup 2 of 6 steps
    lrs, _ = _lrs("cosine", 2, 6, 4, base=1.0)
    assert lrs[2] == pytest.approx(0.9045084971874737, abs=1e-15)
    assert lrs[3] == pytest.approx(0.6545084971874737, abs=1e-15)
    assert _lrs("linear", 1, 3, 3, base=1.0)[0] == pytest.approx([1.0, 2 / 3, 1 / 3])


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize(("warmup", "total"), [(0, 5), (3, 8), (5, 5), (7, 4)])
def test_schedule_is_diffusers_from_its_step_one(kind, warmup, total):
    """Step s of ours == step s + 1 of diffusers' get_scheduler(kind, warmup, total + 1)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=3e-4)
    reference = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total + 1)
    expected = []
    for _ in range(total + 3):
        opt.step()
        reference.step()
        expected.append(opt.param_groups[0]["lr"])
    got, _ = _lrs(kind, warmup, total, total + 3, base=3e-4)
    assert got == expected
    if kind != "constant":  # no training step at LR 0
        assert min(got[:total]) > 0


def test_schedule_names():
    # the config's choices, the names build_optimizer takes, all of them diffusers' names
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr_scheduler")
    assert field.metadata["choices"] == SCHEDULES
    assert set(SCHEDULES) <= {s.value for s in SchedulerType}
    p = torch.nn.Parameter(torch.zeros(1))
    for bad in ("step", "polynomial", "piecewise_constant"):
        with pytest.raises(ValueError, match=f"lr_scheduler must be one of .*got '{bad}'"):
            build_optimizer([p], 0.1, (0.9, 0.999), 0.0, bad, 0, 10)


# ---------------------------------------------------------------- the authors' way, in the Learner
def authors_lrs(kind, lr, warmup, total, sync_every, ppo_epochs, steps):
    """The LR of each update of the KVPO authors' loop, written plainly: diffusers' scheduler
    over ``total`` steps; every rollout makes ``ppo_epochs`` AdamW steps; every ``sync_every``
    rollouts (their gradient_accumulation_steps) the scheduler steps once."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    lrs = []
    for _step in range(steps):
        for _rollout in range(sync_every):
            for _epoch in range(ppo_epochs):
                lrs.append(opt.param_groups[0]["lr"])
                opt.step()
        scheduler.step()
    return lrs


def ours_expected(kind, lr, warmup, total, sync_every, ppo_epochs):
    """Ours: the authors' loop over total + 1 steps, its first step (their LR-0 step in warmup)
    left out."""
    lrs = authors_lrs(kind, lr, warmup, total + 1, sync_every, ppo_epochs, total + 1)
    return lrs[sync_every * ppo_epochs :]


def test_authors_config_first_updates():
    """configs/longlive.yaml's lr 1e-5, warmup 5, sync_every (gradient_accumulation_steps) 2,
    ppo_epochs 1, 1500 steps: their first two updates at LR 0, ours from 2e-6 (the table in
    docs/reference-differences.md)."""
    theirs = authors_lrs("constant_with_warmup", 1e-5, 5, 1500, 2, 1, 7)
    ours = ours_expected("constant_with_warmup", 1e-5, 5, 1500, 2, 1)[:14]
    assert theirs == pytest.approx(
        [0, 0, 2e-6, 2e-6, 4e-6, 4e-6, 6e-6, 6e-6, 8e-6, 8e-6, 1e-5, 1e-5, 1e-5, 1e-5],
        rel=1e-12, abs=0,
    )  # fmt: skip
    assert ours == pytest.approx(
        [2e-6, 2e-6, 4e-6, 4e-6, 6e-6, 6e-6, 8e-6, 8e-6, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5],
        rel=1e-12, abs=0,
    )  # fmt: skip
    # from update 2 * warmup + 1 on (step 5) both are at the full LR
    assert theirs[10:] == ours[10:14]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests.kvpo.trainer_fixtures import tiny_generator_dir

    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def _record_lrs(optimizer) -> list[float]:
    """The LR of every ``optimizer.step()`` call from now on, read from its param group as the
    step begins."""
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    return seen


@pytest.mark.parametrize(
    ("kind", "sync_every", "warmup", "ppo_epochs", "total"),
    [
        ("constant_with_warmup", 2, 5, 1, 8),  # the authors' configuration, shorter
        ("constant_with_warmup", 1, 3, 2, 5),
        ("constant_with_warmup", 3, 2, 2, 4),
        ("constant_with_warmup", 1, 0, 1, 3),
        ("linear", 2, 2, 1, 5),
        ("cosine", 3, 1, 2, 4),
        ("constant", 2, 4, 1, 3),
    ],
)
def test_learner_lr_at_each_update_equals_diffusers_stepped_the_authors_way(
    weights, tmp_path, kind, sync_every, warmup, ppo_epochs, total
):
    """The Learner's own optimizer, schedule and counting (``apply_update`` every epoch,
    ``end_rollout`` every rollout) over ``total * sync_every`` rollouts: the LR of each update,
    read from the optimizer when it steps, equals the authors' loop's one step on; every
    ``sync_every`` rollouts the training step is counted and the old policy re-synced."""
    from kvpo.models.lora import lora_parameters
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    cfg = tiny_config(
        weights, tmp_path, f"lr_scheduler={kind}", f"sync_every={sync_every}",
        f"lr_warmup_steps={warmup}", f"ppo_epochs={ppo_epochs}", f"max_train_steps={total}",
        "lr=1e-3", "max_grad_norm=0",
    )  # fmt: skip
    learner = build_learner(cfg, DistInfo())
    used = _record_lrs(learner.optimizer)
    logged = []
    for rollout in range(total * sync_every):
        assert learner.counters.rollouts == rollout
        assert learner.counters.step == rollout // sync_every
        for _epoch in range(ppo_epochs):
            for p in learner.params:
                p.grad = torch.full_like(p, 0.01)
            logged.append(learner.apply_update(PhaseTimer())["lr"])
        learner.end_rollout()
        synced = learner.counters.since_sync == 0
        assert synced == ((rollout + 1) % sync_every == 0)
        old = lora_parameters(learner.model, "old")
        current = learner.named_params.items()
        same = all(torch.equal(old[k.replace(".default.", ".old.")], v) for k, v in current)
        assert same == synced  # the updates moved the policy; a sync copies it
    assert used == ours_expected(kind, 1e-3, warmup, total, sync_every, ppo_epochs)
    assert logged == used and len(used) == total * sync_every * ppo_epochs
    assert learner.counters.step == total and learner.counters.rollouts == total * sync_every
    if kind != "constant" and warmup > 0:  # the authors' first step is at LR 0, ours is not
        theirs = authors_lrs(kind, 1e-3, warmup, total, sync_every, ppo_epochs, total)
        assert theirs[: sync_every * ppo_epochs] == [0.0] * (sync_every * ppo_epochs)
        assert min(used) > 0


def test_training_run_makes_max_train_steps_times_sync_every_rollouts(weights, tmp_path):
    """``KVPOTrainer.train`` with max_train_steps 3, sync_every 2, ppo_epochs 2: 6 rollouts
    (metrics step 0..5, train_step 0, 0, 1, 1, 2, 2), 12 updates at the LRs of diffusers'
    schedule stepped the authors' way from its step 1; the summary counts 3 steps."""
    from kvpo import KVPOTrainer
    from tests.kvpo.trainer_fixtures import tiny_config

    cfg = tiny_config(
        weights, tmp_path, "run_name=r", "max_train_steps=3", "sync_every=2", "ppo_epochs=2",
        "lr_warmup_steps=2", "eval_before=false", "eval_after=false", "lr=1e-3",
        "sample_interval_steps=0",
    )  # fmt: skip
    trainer = KVPOTrainer(cfg, info=DistInfo())
    used = _record_lrs(trainer.learner.optimizer)
    summary = trainer.train()
    assert summary["steps"] == 3 and summary["rollouts"] == 6 and summary["skipped"] == 0
    assert used == ours_expected("constant_with_warmup", 1e-3, 2, 3, 2, 2)
    assert used == pytest.approx([5e-4] * 4 + [1e-3] * 8, rel=1e-12)
    import json

    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["train_step"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert [r["lr"] for r in records] == used[::2]  # each rollout's first update
    assert [r["sync/first_update_after_sync"] for r in records] == [True, False] * 3


def test_adamw_steps_with_the_scheduled_lr():
    """A constant gradient g: Adam's bias-corrected step is g / (|g| + eps) times the LR, after
    AdamW's decay p *= 1 - lr * wd. The trajectory written out with the LRs 0.05, 0.1, 0.08,
    0.06, 0.04 (linear, warmup 2, total 6: the table above times 0.1)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    g = torch.tensor([2.0, -0.5], dtype=torch.float64)
    wd, eps = 0.01, 1e-8
    optimizer, scheduler = build_optimizer([p], 0.1, (0.9, 0.999), wd, "linear", 2, 6)
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for lr in (0.05, 0.1, 0.08, 0.06, 0.04):
        p.grad = g.clone()
        optimizer.step()
        scheduler.step()
        expected = expected * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
    # as decimals: 1 * (1 - 5e-4) - 0.05 = 0.9495, 0.9495 * 0.999 - 0.1 = 0.8485505, ...
    torch.testing.assert_close(
        p.detach(), torch.tensor([0.6671280, -1.6638322], dtype=torch.float64), rtol=0, atol=1e-7
    )


def test_ema_recurrence():
    w = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    b = torch.tensor([4.0])
    ema = EMA({"w": w, "b": b}, decay=0.9)
    assert ema.shadow["w"].dtype == torch.float32
    w.fill_(100.0), b.fill_(100.0)  # the shadow is a copy
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.0, -2.0]))
    ema.update({"w": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0])})
    # 0.9 * [1, -2] + 0.1 * [2, 0]; 0.9 * 4
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.1, -1.8]))
    torch.testing.assert_close(ema.shadow["b"], torch.tensor([3.6]))
    ema.update({"w": torch.tensor([0.0, 4.0])})  # a name left out keeps its shadow
    # 0.9 * [1.1, -1.8] + 0.1 * [0, 4]
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([0.99, -1.22]))
    torch.testing.assert_close(ema.shadow["b"], torch.tensor([3.6]))
    target = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    ema.copy_to({"w": target})
    assert target.dtype == torch.bfloat16
    torch.testing.assert_close(target.detach(), torch.tensor([0.99, -1.22]).bfloat16())


def test_ema_decay_zero_tracks_the_latest_value():
    ema = EMA({"w": torch.tensor([1.0])}, decay=0.0)
    ema.update({"w": torch.tensor([-3.5])})
    assert ema.shadow["w"].tolist() == [-3.5]


def test_grad_norm():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    c = torch.nn.Parameter(torch.zeros(3))
    assert grad_norm([a, b, c]) == 0.0
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    assert grad_norm([a, b, c]) == pytest.approx(13.0)  # sqrt(9 + 16 + 144); c has no grad
