"""Scale-out helpers: one prompt group per rank, gradients of the trainable weights averaged.

Launched by ``torchrun --nproc_per_node N -m kvpo.train`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), the trainer calls :func:`init_distributed`:
gloo on CPU, NCCL on CUDA (one device per local rank). Without those variables it runs as a
single process and every collective here is a no-op. Gradients are averaged by flattening the
trainable parameters' gradients into one buffer and one ``all_reduce`` (explicit, instead of
DDP, because a KVPO step runs several forwards of different shapes before one backward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is present, else CPU; otherwise ``name``."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but torch sees no CUDA device")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (or run alone when it describes none)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistInfo(device=resolve_device(device, 0))
    rank = int(os.environ["RANK"])
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev, backend)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """An independent 63-bit seed per ``(seed, rank, stream)`` (NumPy SeedSequence)."""
    words = np.random.SeedSequence([seed, rank, stream]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Replace each parameter's ``.grad`` by its mean over ranks (a missing grad counts as 0)."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def broadcast_parameters(params: list[torch.Tensor], info: DistInfo, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s values (in place)."""
    if not info.enabled:
        return
    for p in params:
        dist.broadcast(p.data, src=src)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on some rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled Python objects)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _collective_device(info: DistInfo) -> torch.device:
    return info.device if info.backend == "nccl" else torch.device("cpu")
