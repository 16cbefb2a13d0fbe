"""Data parallelism helpers: join the process group ``torchrun`` describes, and know who writes.

Under ``torchrun --nproc_per_node N -m steadygrad train ...`` the environment holds RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; ``setup()`` joins that group (gloo on CPU, nccl on GPUs). Outside torchrun it
does nothing and reports rank 0 of 1.
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_distributed", "rank", "setup", "teardown", "world_size"]


def setup() -> tuple[int, int]:
    """Join the process group from the environment if there is one; returns (rank, world size)."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def teardown() -> None:
    """Leave the process group once every rank has finished: a barrier, then ``destroy_process_group``.

    A process that exits without destroying its group, or while a peer is still exchanging with it, can die in
    gloo's threads at interpreter shutdown ("terminate called without an active exception"). Call it only after
    a run every rank completed: a rank that failed never reaches the barrier, and torchrun stops the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1
