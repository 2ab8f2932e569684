"""The learner's update on random tiny weights: micro-batching and gradient checkpointing give the
full batch's gradient, and one update moves probability toward the positive-advantage branches."""

import pytest
import torch

from tests.kvpo.trainer_fixtures import tiny_generator_dir


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_generator_dir(tmp_path_factory.mktemp("tiny_generator"))


def test_micro_batched_step_matches_full_batch(weights, tmp_path):
    """row_micro_batch=2 (rollout, replays and evaluation in micro-batches; the current policy's
    replay in two passes: dL/dE, then each micro-batch's share) and gradient checkpointing give
    the gradient of all rows at once."""
    from kvpo.training.distributed import DistInfo
    from kvpo.training.phases import PhaseTimer
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    grads, records = [], []
    for micro, ckpt in ((0, "false"), (2, "false"), (0, "true")):
        cfg = tiny_config(
            weights, tmp_path, f"row_micro_batch={micro}", f"gradient_checkpointing={ckpt}"
        )
        torch.manual_seed(5)
        trainer = build_learner(cfg, DistInfo())
        trainer.optimizer.zero_grad(set_to_none=True)
        records.append(trainer.group_gradients(1, PhaseTimer()))
        grads.append({k: p.grad.clone() for k, p in trainer.named_params.items()})
        assert trainer.rows_per_batch == (4 if micro == 0 else 2)
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for other in (1, 2):  # micro-batched; gradient checkpointing
        assert records[0]["loss"] == pytest.approx(records[other]["loss"], rel=1e-5)
        torch.testing.assert_close(
            torch.tensor(records[0]["energy/current"]),
            torch.tensor(records[other]["energy/current"]),
        )
        for name in grads[0]:
            torch.testing.assert_close(grads[other][name], grads[0][name], rtol=1e-4, atol=1e-9)


def test_update_moves_probability_toward_positive_advantages(weights, tmp_path):
    """Wiring and sign, end to end: after one update on a group with given advantages, the
    replayed branch policy puts more log-probability on the positive-advantage branches."""
    from kvpo.method.policy import branch_log_probs
    from kvpo.training.distributed import DistInfo
    from kvpo.training.learner import GroupData
    from kvpo.training.phases import PhaseTimer
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    cfg = tiny_config(weights, tmp_path, "kl_coef=0", "lr=1e-4", "lr_warmup_steps=1")
    trainer = build_learner(cfg, DistInfo())
    prompts = trainer.prompts.train(0, 0)
    ro = trainer.rollout(0, prompts, 0)
    adv = torch.tensor([1.0, -1.0, 0.5])
    with torch.no_grad():
        before = trainer.energies(ro, prompts, [0, 1, 2], "default")
        old = trainer.energies(ro, prompts, [0, 1, 2], "old")
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.policy_gradients(GroupData(ro, prompts, adv, True, old, old, {}), PhaseTimer())
    trainer.apply_update(PhaseTimer())
    with torch.no_grad():
        after = trainer.energies(ro, prompts, [0, 1, 2], "default")
    trainer.cache.free([ro.snapshot])
    gain = (adv * (branch_log_probs(after, cfg.tau) - branch_log_probs(before, cfg.tau))).sum()
    assert gain > 0, (before, after)
    # the energy of the best branch fell relative to the worst one's
    assert (after[0] - after[1]) < (before[0] - before[1])
