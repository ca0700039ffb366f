"""Process-group helpers for `torchrun --nproc_per_node N -m nlvid train ...` (DDP).

One process per device; `env://` initialisation from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Backend: NCCL on CUDA, gloo on the CPU. Only rank 0 writes files and prints.

Sharding (`shard_batches`) is deterministic and chosen so that N processes with per-process batch B see exactly the
global batches of one process with batch N*B: global batch i is split into N contiguous slices, slice r goes to
rank r. (torch's DistributedSampler interleaves instead, which gives the same global batches but a different split
of each one; a contiguous split also matches one process with batch B and `accum_steps=N` micro-batch for
micro-batch, which is how the 2-process test checks the DDP path exactly.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nlvid.data.sampling import epoch_order


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """What torchrun announced through the environment (world size 1 when not launched by it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process). Returns this process's place in it."""
    info = env_info()
    if not info.enabled:
        return info
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, init_method="env://")
    return info


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shard_batches(order: list[int], *, batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[int]]:
    """Split an epoch order into this rank's batches: global batch i = order[i*B*N : (i+1)*B*N] (N processes,
    per-process batch B); rank r takes the r-th contiguous slice of it. The last global batch may be short; it is
    split into N equal slices (the order length is a multiple of N)."""
    gb = batch_size * world_size
    out = []
    for start in range(0, len(order), gb):
        chunk = order[start : start + gb]
        per = len(chunk) // world_size
        out.append(chunk[rank * per : (rank + 1) * per])
    return [b for b in out if b]


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BN running statistics) over processes, e.g. after precise BN."""
    if not info.enabled:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world_size)
