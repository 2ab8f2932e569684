"""The protect gates (kvpo.training.gates) against plain transcriptions of the authors' code.

Their ``train_step`` (``models/longlive/trainer/kvpo.py``; MemFlow's is the same):
``mechanism_1`` zeroes the loss of a rank where no branch beats the anchor and skips the optimizer
step when ``not global_has_safe_policy``; ``mechanism_2`` skips it when on some rank
``min_update_entropy_ratio > 0 and cur_ent > log(G) * (1 - ratio)``, the entropy coming from
``_per_step_mechanism2_anchor_scale_entropy`` (an anchor slot beside the branch log-softmax).
"""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from kvpo.method.policy import PolicyConfig, policy_loss
from kvpo.training.gates import gated_entropy, skip_update
from tests.kvpo.test_distributed import _free_port
from tests.kvpo.trainer_fixtures import tiny_generator_dir

TAU = 2.0


def _their_entropy(energy: torch.Tensor, rank_is_safe: bool) -> float:
    """``_per_step_mechanism2_anchor_scale_entropy(log_softmax(scores), rank_is_safe)[1]`` with
    their trajectory scores ``-E / tau`` (float64)."""
    log_pi_theta = torch.log_softmax(-energy.double() / TAU, dim=0)
    anchor = torch.tensor(float("-inf") if rank_is_safe else 0.0, dtype=torch.float64)
    pi_full = torch.softmax(torch.cat([log_pi_theta, anchor.reshape(1)]), dim=0)
    pi_branch = pi_full[:-1]
    return float(-(pi_branch * torch.log(pi_branch + 1e-10)).sum())


def _their_skip(energy, rank_is_safe, ratio, mode) -> bool:
    """One rank's ``skip_update`` of their epoch tail."""
    if mode == "mechanism_1":
        return not rank_is_safe  # global_has_safe_policy on one rank
    G = energy.numel()
    max_entropy = math.log(G)
    cur_ent = _their_entropy(energy, rank_is_safe)
    return ratio > 0 and max_entropy > 0 and cur_ent > max_entropy * (1.0 - ratio)


def _energies():
    gen = torch.Generator().manual_seed(0)
    for spread in (0.0, 0.05, 0.5, 2.0, 8.0, 40.0):
        yield 10.0 + spread * torch.randn(8, generator=gen, dtype=torch.float64)


def test_entropy_and_decisions_match_theirs():
    decisions = set()
    for energy in _energies():
        for safe in (True, False):
            assert gated_entropy(energy, safe, TAU) == pytest.approx(
                _their_entropy(energy, safe), abs=1e-8
            )
            for ratio in (0.0, 0.01, 0.1, 0.3, 0.6, 1.0):
                config = PolicyConfig(tau=TAU, protect_mode="gate", min_update_entropy_ratio=ratio)
                ours = skip_update(config, energy.float(), safe)
                assert ours == _their_skip(energy, safe, ratio, "mechanism_2"), (energy, safe)
                decisions.add(ours)
            ours = skip_update(PolicyConfig(tau=TAU, protect_mode="skip"), energy, safe)
            assert ours == _their_skip(energy, safe, 0.0, "mechanism_1")
    assert decisions == {True, False}


def _their_mechanism_1_loss(energy, energy_old, energy_ref, adv, rank_is_safe, kl_coef=10.0):
    """Their mechanism_1 total loss: 0 on an unsafe rank, else the clipped surrogate plus the
    discrete KL to the reference (``_compute_policy_objective_from_logits``)."""
    if not rank_is_safe:
        return torch.zeros((), dtype=torch.float64)
    scores, old, ref = (-e.double() / TAU for e in (energy, energy_old, energy_ref))
    log_ratio = (scores - torch.logsumexp(scores, 0)) - (old - torch.logsumexp(old, 0))
    ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 0.9, 1.2) * adv)
    log_pi, log_ref = torch.log_softmax(scores, 0), torch.log_softmax(ref, 0)
    kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    return -surrogate.mean() + kl_coef * kl


def test_skip_mode_loss_is_theirs():
    from kvpo.training.config import TrainConfig

    config = TrainConfig(protect_mode="skip").policy_config()
    assert config.gated_scale == 0.0  # whatever gated_scale says
    gen = torch.Generator().manual_seed(3)
    energy, old, ref = (10 + torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(3))
    adv = torch.randn(8, generator=gen, dtype=torch.float64)
    for safe in (True, False):
        e = energy.clone().requires_grad_()
        out = policy_loss(e, old, ref, adv, beats_anchor=safe, config=config)
        expected = _their_mechanism_1_loss(energy, old, ref, adv, safe)
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
        out.loss.backward()
        assert (e.grad.abs().sum() > 0) == safe


def _gate_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from kvpo.training.distributed import init_distributed, shutdown

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    flat = torch.full((8,), 5.0)  # uniform policy: entropy ln 8 on a safe rank
    sharp = torch.arange(8.0) * 40.0  # nearly one branch: entropy ~ 0
    skip = PolicyConfig(protect_mode="skip")
    gate = PolicyConfig(protect_mode="gate", min_update_entropy_ratio=0.5)
    out = {
        # mechanism_1: only rank 0 has a better branch -> no rank skips
        "one_safe": skip_update(skip, flat, rank == 0, info),
        "none_safe": skip_update(skip, flat, False, info),
        # mechanism_2: only rank 1's entropy is high -> every rank skips
        "one_high": skip_update(gate, flat if rank == 1 else sharp, True, info),
        "none_high": skip_update(gate, sharp, True, info),
    }
    torch.save(out, os.path.join(out_dir, f"gate{rank}.pt"))
    shutdown(info)


def test_decisions_are_global_over_two_ranks(tmp_path):
    mp.spawn(_gate_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"gate{rank}.pt")
        assert out == {"one_safe": False, "none_safe": True, "one_high": True, "none_high": False}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def _learner(weights, tmp_path, *extra):
    from kvpo.training.distributed import DistInfo
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    torch.manual_seed(5)
    return build_learner(tiny_config(weights, tmp_path, *extra), DistInfo())


def _params(trainer):
    return {k: p.detach().clone() for k, p in trainer.named_params.items()}


def test_skipped_update_moves_nothing(weights, tmp_path):
    """protect_mode=skip with no branch beating the anchor: zero gradient, no AdamW step (no
    state, no weight decay), no EMA update; with a better branch the same update steps."""
    from kvpo.training.learner import GroupData
    from kvpo.training.phases import PhaseTimer

    trainer = _learner(weights, tmp_path, "protect_mode=skip", "lr_warmup_steps=1")
    prompts = trainer.prompts.train(0, 0)
    ro = trainer.rollout(0, prompts, 0)
    with torch.no_grad():
        old = trainer.energies(ro, prompts, [0, 1, 2], "old")
    adv = torch.tensor([1.0, -1.0, 0.5])
    for shadow in trainer.ema.shadow.values():
        shadow.zero_()  # an EMA update would move it toward the weights
    before = _params(trainer)
    for safe in (False, True):
        trainer.optimizer.zero_grad(set_to_none=True)
        record = trainer.policy_gradients(
            GroupData(ro, prompts, adv, safe, old, old, {}), PhaseTimer()
        )
        assert record["update/skipped"] is (not safe)
        trainer.apply_update(PhaseTimer(), record["update/skipped"])
        moved = any(not torch.equal(before[k], p) for k, p in _params(trainer).items())
        ema_moved = any(s.abs().sum() > 0 for s in trainer.ema.shadow.values())
        assert moved == ema_moved == bool(trainer.optimizer.state) == safe
        if not safe:
            assert record["loss"] == 0.0
            assert all(p.grad is None or not p.grad.any() for p in trainer.params)
    trainer.cache.free([ro.snapshot])


def test_entropy_skip_in_a_training_step(weights, tmp_path):
    """min_update_entropy_ratio=1: every non-degenerate policy is above (1 - 1) ln G, so every
    epoch's update is skipped; the rollout still counts."""
    trainer = _learner(weights, tmp_path, "min_update_entropy_ratio=1.0", "ppo_epochs=2")
    before = _params(trainer)
    record = trainer.train_step(0)
    assert record["update/skipped"] and record["policy/entropy"] > 0
    assert all(torch.equal(before[k], p) for k, p in _params(trainer).items())
    assert not trainer.optimizer.state and trainer.counters.rollouts == 1
