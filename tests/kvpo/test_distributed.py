"""Two real gloo processes: the averaged update equals one process updating on both groups."""

import os
import socket

import torch
import torch.multiprocessing as mp

from kvpo.training.distributed import (
    DistInfo,
    any_rank,
    average_gradients,
    broadcast_parameters,
    gather_objects,
    init_distributed,
    rank_seed,
    shutdown,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_loss(model: torch.nn.Module, group: int) -> torch.Tensor:
    """A stand-in for one prompt group's KVPO loss: a different batch per group."""
    gen = torch.Generator().manual_seed(100 + group)
    x = torch.randn(8, 5, generator=gen)
    y = torch.randn(8, 2, generator=gen)
    return (model(x) - y).pow(2).mean()


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _plain_model_steps(rank: int, info, out_dir: str) -> None:
    """Three AdamW steps of a small MLP on this rank's group, gradients averaged."""
    assert info.backend == "gloo" and info.rank == rank
    model = _model(seed=rank)  # different initial weights per rank ...
    params = list(model.parameters())
    broadcast_parameters(params, info)  # ... until rank 0's are broadcast
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _group_loss(model, group=rank).backward()
        average_gradients(params, info)
        opt.step()
    flags = any_rank(rank == 1, info), any_rank(False, info)
    seeds = gather_objects(rank_seed(42, rank), info)
    torch.save(
        {"params": [p.detach() for p in params], "flags": flags, "seeds": seeds},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def _check_plain_model(out_dir) -> None:
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]
    model = _model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        # the mean of the two groups' losses has the mean of their gradients
        (0.5 * (_group_loss(model, 0) + _group_loss(model, 1))).backward()
        opt.step()
    for r in range(2):
        for p, q in zip(model.parameters(), results[r]["params"]):
            torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)
        assert results[r]["flags"] == (True, False)
        assert results[r]["seeds"] == [rank_seed(42, 0), rank_seed(42, 1)]
    assert rank_seed(42, 0) != rank_seed(42, 1)


def test_single_process_is_a_no_op():
    info = DistInfo()
    model = _model(0)
    _group_loss(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    average_gradients(list(model.parameters()), info)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert any_rank(True, info) and gather_objects(3, info) == [3]


def _trainer(weights, run_dir, info):
    from kvpo.training.trainer import build_learner
    from tests.kvpo.trainer_fixtures import tiny_config

    cfg = tiny_config(weights, run_dir)
    torch.manual_seed(123)  # the LoRA init; ranks > 0 receive rank 0's by broadcast anyway
    return build_learner(cfg, info)


def _kvpo_worker(rank: int, world: int, port: int, weights: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    _plain_model_steps(rank, info, out_dir)
    trainer = _trainer(weights, out_dir, info)
    record = trainer.train_step(0)
    params = {k: v.detach().clone() for k, v in trainer.named_params.items()}
    grads = {k: v.grad.clone() for k, v in trainer.named_params.items()}  # averaged, clipped
    torch.save(
        {"params": params, "grads": grads, "loss": record["loss"]},
        os.path.join(out_dir, f"kvpo{rank}.pt"),
    )
    shutdown(info)


def test_kvpo_step_two_ranks_equals_one_process_two_groups(tmp_path):
    """Two gloo processes: a plain MLP's averaged updates equal one process on both groups'
    mean loss; one KVPO step with a group per rank == one process accumulating both groups'
    gradients (rank 0's and rank 1's prompts, plans and noise), averaged, then one update."""
    from kvpo.training.phases import PhaseTimer
    from tests.kvpo.trainer_fixtures import tiny_generator_dir

    weights = tiny_generator_dir(tmp_path / "weights")
    mp.spawn(_kvpo_worker, args=(2, _free_port(), str(weights), str(tmp_path)), nprocs=2, join=True)
    _check_plain_model(tmp_path)
    results = [torch.load(tmp_path / f"kvpo{r}.pt") for r in range(2)]

    trainer = _trainer(weights, tmp_path, DistInfo())
    timer = PhaseTimer()
    trainer.optimizer.zero_grad(set_to_none=True)
    losses = [trainer.group_gradients(0, timer, rank=r)["loss"] for r in range(2)]
    for p in trainer.params:
        p.grad /= 2
    trainer.apply_update(timer)
    assert losses == [results[0]["loss"], results[1]["loss"]]
    # the same averaged gradient up to fp32 summation order; AdamW's first step is ~lr * sign(g)
    # (lr 2e-3 in warmup), so parameters agree to well below one update
    for name, p in trainer.named_params.items():
        for r in range(2):
            torch.testing.assert_close(results[r]["grads"][name], p.grad, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(results[r]["params"][name], p.detach(), rtol=0, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in results[0]["grads"].values())
