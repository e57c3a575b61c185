"""Where this process sits in a launch: the one lookup of rank, world size and local rank.

* ``torchrun`` (single node or multi-node rendezvous) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``;
* SLURM's ``srun`` (one task per GPU) sets ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID``;
  the rendezvous host is the first node of ``SLURM_JOB_NODELIST`` (or ``MASTER_ADDR`` when set) and
  the port ``MASTER_PORT`` (default: derived from the job id).

torchrun's variables win when both are present (``srun torchrun ...``). Every command (train,
cache-text, eval, index, the shard reader) asks here, so ``srun`` without torchrun splits the work the
same way everywhere.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

from .errors import UserError

__all__ = ["DEFAULT_PORT", "Launch", "read_launch", "detect_launch", "local_process", "process_rank", "join_process_group",
           "slurm_first_host", "default_barrier", "join_barrier_group"]

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Launch:
    """Where this process sits, as the launcher said (``launcher`` is ``"none"`` for a lone process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def read_launch(env: Mapping[str, str] | None = None) -> Launch:
    """This process's place from the environment alone (no rendezvous address, no subprocess)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return Launch(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun",
                      env.get("MASTER_ADDR"), int(port) if port else None)
    if "SLURM_NTASKS" in env:
        return Launch(int(env.get("SLURM_PROCID", 0)), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                      "slurm")
    return Launch()


def detect_launch(env: Mapping[str, str] | None = None) -> Launch | None:
    """The multi-process launch this process belongs to, with its rendezvous address; None when alone."""
    env = os.environ if env is None else env
    launch = read_launch(env)
    if not launch.enabled:
        return None
    if launch.launcher == "slurm":
        addr = env.get("MASTER_ADDR") or slurm_first_host(env.get("SLURM_JOB_NODELIST") or env["SLURMD_NODENAME"])
        port = env.get("MASTER_PORT")
        port = int(port) if port else DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 10_000
        return Launch(launch.rank, launch.world_size, launch.local_rank, "slurm", addr, port)
    return launch


def local_process(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(local_rank, world_size)`` of this process; ``(0, 1)`` when not launched."""
    launch = read_launch(env)
    return launch.local_rank, launch.world_size


def process_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given pair when a caller passes one (both or neither; checked), else the
    process group's when one is initialised, else the launcher's."""
    import torch.distributed as dist

    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is not None:
        rank, world_size = int(rank), int(world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        return rank, world_size

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    launch = read_launch()
    return launch.rank, launch.world_size


def join_process_group(launch: Launch, backend: str, timeout: timedelta) -> None:
    """``torch.distributed.init_process_group`` for ``launch``: torchrun's ``env://`` rendezvous, or a TCP
    one at the SLURM job's first host (srun sets no ``MASTER_ADDR``)."""
    import torch.distributed as dist

    if launch.launcher == "slurm":
        dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-005,010],cpu1"`` -> ``"gpu003"``.

    Uses ``scontrol show hostnames`` when it is on the PATH, else parses the compressed form."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = first.group(1), first.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def default_barrier() -> None:
    """``torch.distributed.barrier()`` when a process group of several ranks is initialised, else nothing:
    the barrier of the resumable passes (the text cache, ``ldmclip embed``) when none is given."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def join_barrier_group() -> Any:
    """Under torchrun or srun: a gloo process group, for the barriers of commands whose ranks share only a
    folder (cache-text, embed). Returns ``torch.distributed`` when this call made the group (the caller
    destroys it), else None (a single process, or a group that exists already)."""
    import torch.distributed as dist

    launch = detect_launch()
    if launch is None or not dist.is_available() or dist.is_initialized():
        return None
    # Ranks that finish early wait at the final barrier for the slowest one: allow a long wait.
    join_process_group(launch, "gloo", timedelta(days=7))
    return dist
