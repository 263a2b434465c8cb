"""Multi-process training with PyTorch's own engines: torchrun, DDP, DistributedSampler.

One process (``train.nproc: 1``, no torchrun environment) takes none of this code, so the default
run stays byte-identical. Under ``torchrun`` each process learns its rank from the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); only rank 0 writes files and prints.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stages.common.infra.errors import StageError
from stages.common.infra.processes import die_with_parent


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(module: str, nproc: int) -> int:
    """Run ``python -m module`` in ``nproc`` local processes under torchrun; its exit code.

    --standalone picks a free local rendezvous port, so parallel runs (dvc queue workers) do not
    collide. Across nodes, call torchrun yourself (docs/scale-out.md); then this is not used.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", module]
    print(f"launching {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, preexec_fn=die_with_parent).returncode


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up; nccl on CUDA (one GPU per process), else gloo."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(), device
    if device.type not in ("cuda", "cpu"):
        raise StageError(f"distributed training runs on cuda or cpu, not {device.type}; "
                         "set train.device")
    die_with_parent()  # with torchrun's agent, which dies with our launcher (see processes.py)
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                  int(os.environ["WORLD_SIZE"]))
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def shutdown(world: World) -> None:
    if world.distributed:
        dist.destroy_process_group()


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64, so counts stay exact)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sync_buffers(model: nn.Module, world: World) -> None:
    """Give every rank rank 0's BatchNorm running stats.

    DDP broadcasts buffers at the start of each training forward, but after the epoch's last
    batch each rank holds stats updated by its own batch; without this the ranks would validate
    slightly different models, and the reduced val loss would not be that of the saved checkpoint.
    """
    if world.distributed:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def shard_indices(n: int, world: World) -> list[int]:
    """Rank r's share of n val items: every world.size-th from r. Unlike DistributedSampler it
    pads nothing, so summed over ranks every item counts exactly once."""
    return list(range(world.rank, n, world.size))


def all_equal(value: int, world: World, device: torch.device) -> bool:
    """Whether every process holds the same integer (e.g. the epoch it would resume from)."""
    if not world.distributed:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item() == -t[1].item()


def gather_to_main(obj, world: World) -> list | None:
    """Every rank's ``obj`` on rank 0 (a list by rank), None elsewhere; ``[obj]`` alone."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
