"""Two real gloo processes: the averaged update equals one process updating on both groups."""

import os
import socket

import torch
import torch.multiprocessing as mp

from kvpo.distributed import (
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


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = init_distributed("cpu")
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
    shutdown(info)


def test_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

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
