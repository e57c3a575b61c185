"""Process-group setup and the few collectives the trainer needs, on ``torch.distributed``.

Where this process sits (torchrun or SLURM) is ``core.launch``'s one lookup. Backends: NCCL for CUDA
tensors (with gloo beside it for the small CPU-side agreements), gloo on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..core.devices import resolve_device
from ..core.launch import detect_launch, join_process_group, local_process


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module initialised the process group (and tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str, timeout_s: float) -> DistInfo:
    """Join the process group of this launch (or the one already initialised); pick the device.

    ``timeout_s`` bounds every collective: a process whose peer died or hangs raises instead of
    waiting forever (gloo notices a closed connection at once; NCCL's watchdog aborts after the
    timeout)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = local_process()[0]
        return DistInfo(rank, world, local, resolve_device(device_name, local, world), owns_group=False)
    launch = detect_launch()
    if launch is None:
        return DistInfo(device=resolve_device(device_name, 0, 1))
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run a single process")
    device = resolve_device(device_name, launch.local_rank, launch.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    join_process_group(launch, backend, timedelta(seconds=timeout_s))
    return DistInfo(launch.rank, launch.world_size, launch.local_rank, device, owns_group=True)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Agreements: every rank takes the same decision, so none is left waiting in a collective.


def agree(info: DistInfo, *, stop: bool, bad: bool, batch: int) -> tuple[bool, bool, int]:
    """One small all-reduce per step: (any rank asked to stop, any rank's data is bad, the smallest
    local batch). Ranks whose batches differ (unreadable samples in a stream) trim to the smallest,
    so the features they gather have one shape."""
    if not info.enabled:
        return stop, bad, batch
    flags = torch.tensor([float(stop), float(bad), -float(batch)], dtype=torch.float64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1]), int(-flags[2])


def mean_over_ranks(info: DistInfo, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (the global loss from the local losses)."""
    if not info.enabled:
        return value
    total = value.detach().to(torch.float64).reshape(1).cpu()
    dist.all_reduce(total)
    return (total / info.world_size).reshape(())


def sum_over_ranks(info: DistInfo, value: int) -> int:
    if not info.enabled:
        return value
    total = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total)


def broadcast_object(info: DistInfo, value):
    """Rank 0's ``value`` on every rank."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(info: DistInfo, value) -> list | None:
    """Every rank's ``value`` on rank 0 (in rank order); None on the other ranks."""
    if not info.enabled:
        return [value]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is what a collective raises when a peer died, hung or was killed."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                  "broken pipe", "socket", "watchdog"))
