"""One trace in several processes: the ranks of a torch.distributed group (torchrun) or independent
shards (`adag trace --shard I/N`, e.g. the tasks of a SLURM job array on a shared filesystem).

Both split the batch plan the same way (`Shard.owns`: rank r takes batches r, r + N, ...) and write
their parts into one run directory. The ranks of a group also exchange what needs the whole
dataset (dataset-wide node selection) and let rank 0 commit; independent shards each commit if they
find themselves last (`adag trace --finish RUN` does it otherwise).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from adag.store import Shard


def group_shard() -> Shard | None:
    """This process's shard when it is one rank of an initialised process group of several."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Shard(dist.get_rank(), dist.get_world_size())
    return None


@contextlib.contextmanager
def torchrun_group(device: str) -> Iterator[str]:
    """Under torchrun (WORLD_SIZE > 1), join the process group for the duration and give this rank's
    device: `cuda` becomes cuda:LOCAL_RANK. The backend is gloo on every machine: tracing exchanges
    only barriers and one CPU tensor (the dataset-wide scores), never activations."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    dist.init_process_group("gloo")
    try:
        yield f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device
    finally:
        dist.destroy_process_group()


def any_rank(flag: bool, distributed: bool) -> bool:
    """Whether `flag` holds in any rank (just `flag` outside a group): every rank takes the same branch."""
    if not distributed:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def pool_over_ranks(pooled: torch.Tensor, aggregation: str) -> None:
    """Combine every rank's pooled scores in place: the max ('any') or the sum (each rank holds its share
    of the mean)."""
    dist.all_reduce(pooled, op=dist.ReduceOp.MAX if aggregation == "any" else dist.ReduceOp.SUM)


def barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()
