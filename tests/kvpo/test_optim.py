"""Optimiser schedules, the LR AdamW actually steps with, the EMA and the gradient norm
(``kvpo.training.optim``), against numbers written out here."""

import math

import pytest
import torch

from kvpo.training.optim import EMA, build_optimizer, grad_norm, lr_factor

# cos(pi / 6) = sqrt(3) / 2
COS30 = math.sqrt(3) / 2


@pytest.mark.parametrize(
    ("kind", "warmup", "total", "expected"),
    [
        ("constant", 4, 10, {0: 1.0, 3: 1.0, 4: 1.0, 9: 1.0, 10: 1.0, 50: 1.0}),
        ("constant", 0, 0, {0: 1.0, 7: 1.0}),
        # warmup (step + 1) / 4 over steps 0..3, then 1
        ("constant_with_warmup", 4, 10,
         {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 9: 1.0, 10: 1.0, 50: 1.0}),
        ("constant_with_warmup", 0, 10, {0: 1.0, 1: 1.0, 20: 1.0}),
        # after warmup: progress (step - 4) / 6; 1 - progress, clamped at 0 past the end
        ("linear", 4, 10,
         {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 5: 5 / 6, 7: 0.5, 9: 1 / 6, 10: 0.0, 11: 0.0, 99: 0.0}),
        ("linear", 0, 4, {0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25, 4: 0.0, 5: 0.0}),
        # after warmup: (1 + cos(pi * progress)) / 2
        ("cosine", 4, 10,
         {0: 0.25, 2: 0.75, 3: 1.0, 4: 1.0, 5: (1 + COS30) / 2, 7: 0.5, 9: (1 - COS30) / 2,
          10: 0.0, 11: 0.0, 99: 0.0}),
        ("cosine", 0, 2, {0: 1.0, 1: 0.5, 2: 0.0, 3: 0.0}),
    ],
)  # fmt: skip
def test_lr_factor(kind, warmup, total, expected):
    got = {step: lr_factor(step, kind, warmup, total) for step in expected}
    assert got == pytest.approx(expected, abs=1e-12)


def test_lr_factor_values_written_out():
    # the cosine numbers above, as decimals
    assert lr_factor(5, "cosine", 4, 10) == pytest.approx(0.9330127018922193, abs=1e-15)
    assert lr_factor(9, "cosine", 4, 10) == pytest.approx(0.0669872981077807, abs=1e-15)
    assert lr_factor(0, "linear", 1, 3) == 1.0  # warmup 1: the first step at the full LR
    assert lr_factor(1, "linear", 1, 3) == 1.0  # the step after warmup
    assert lr_factor(2, "linear", 1, 3) == 0.5  # the last step


def test_unknown_schedule():
    with pytest.raises(ValueError, match="lr_scheduler must be one of .*got 'step'"):
        lr_factor(0, "step", 0, 10)


def _adamw_lr(kind, warmup, total, updates, base=0.1):
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = build_optimizer([p], base, (0.8, 0.9), 0.0, kind, warmup, total)
    lrs = []
    for _ in range(updates):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # base 0.1, warmup 2, total 6: updates 0, 1 warm up; update 2 at the full LR; then a
        # line to 0 at update 6 (progress (k - 2) / 4)
        ("linear", [0.05, 0.1, 0.1, 0.075, 0.05, 0.025, 0.0, 0.0]),
        ("constant_with_warmup", [0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
        ("cosine", [0.05, 0.1, 0.1, 0.1 * (2 + math.sqrt(2)) / 4, 0.05,
                    0.1 * (2 - math.sqrt(2)) / 4, 0.0, 0.0]),
        ("constant", [0.1] * 8),
    ],
)  # fmt: skip
def test_lr_of_each_update(kind, expected):
    lrs, optimizer = _adamw_lr(kind, 2, 6, 8)
    assert lrs == pytest.approx(expected, abs=1e-12)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.0
    assert isinstance(optimizer, torch.optim.AdamW)


def test_adamw_steps_with_the_scheduled_lr():
    """A constant gradient g: Adam's bias-corrected step is g / (|g| + eps) times the LR, after
    AdamW's decay p *= 1 - lr * wd. The trajectory written out with the LRs 0.05, 0.1, 0.1,
    0.075, 0.05 (linear, warmup 2, total 6)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    g = torch.tensor([2.0, -0.5], dtype=torch.float64)
    wd, eps = 0.01, 1e-8
    optimizer, scheduler = build_optimizer([p], 0.1, (0.9, 0.999), wd, "linear", 2, 6)
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for lr in (0.05, 0.1, 0.1, 0.075, 0.05):
        p.grad = g.clone()
        optimizer.step()
        scheduler.step()
        expected = expected * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
    # as decimals: 1 * (1 - 5e-4) - 0.05 = 0.9495, 0.9495 * 0.999 - 0.1 = 0.8485505, ...
    torch.testing.assert_close(
        p.detach(), torch.tensor([0.6218051, -1.6180606], dtype=torch.float64), rtol=0, atol=1e-7
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
